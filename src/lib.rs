//! kairos: streaming inference engine.
