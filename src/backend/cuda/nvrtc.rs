//! NVRTC compilation of `kernels/*.cu` for the device's architecture, with an on-disk PTX
//! cache keyed by source hash + architecture + driver + NVRTC version + options, and the
//! persistent step's source and options.

use std::path::PathBuf;

use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};

use super::{persistent, CudaError, Result, COMMON, SOURCES};

fn fnv1a(h: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *h ^= *b as u64;
        *h = h.wrapping_mul(0x100000001b3);
    }
}

/// `$KAIROS_PTX_CACHE`, else `$XDG_CACHE_HOME/kairos/ptx`, else `~/.cache/kairos/ptx`.
pub fn ptx_cache_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KAIROS_PTX_CACHE") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(p).join("kairos").join("ptx"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("kairos").join("ptx"))
}

pub(super) fn driver_version() -> i32 {
    let mut v = 0i32;
    unsafe {
        let _ = cudarc::driver::sys::cuDriverGetVersion(&mut v);
    }
    v
}

pub(super) fn nvrtc_version() -> (i32, i32) {
    let (mut a, mut b) = (0i32, 0i32);
    unsafe {
        let _ = cudarc::nvrtc::sys::nvrtcVersion(&mut a, &mut b);
    }
    (a, b)
}

/// PTX of one module: from the cache when present, else compiled by NVRTC (and cached).
/// Returns (ptx, came_from_cache).
pub(super) fn compile_cached(
    module: &str,
    src: &str,
    opts_list: &[String],
    cache: Option<&std::path::Path>,
    arch: &str,
    drv: i32,
    nvrtc: (i32, i32),
) -> Result<(Ptx, bool)> {
    let full = format!("{COMMON}\n#line 1 \"kernels/{module}.cu\"\n{src}");
    let mut h = 0xcbf29ce484222325u64;
    fnv1a(&mut h, full.as_bytes());
    fnv1a(
        &mut h,
        format!("{arch}|{drv}|{nvrtc:?}|{opts_list:?}").as_bytes(),
    );
    let path = cache.map(|d| d.join(format!("{module}-{h:016x}.ptx")));
    if let Some(s) = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
        return Ok((Ptx::from_src(s), true));
    }
    let opts = CompileOptions {
        options: opts_list.to_vec(),
        name: Some(format!("{module}.cu")),
        ..Default::default()
    };
    let ptx = compile_ptx_with_opts(&full, opts).map_err(|e| CudaError::Compile {
        module: module.to_string(),
        log: match &e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                log.to_string_lossy().into_owned()
            }
            other => format!("{other:?}"),
        },
    })?;
    if let Some(p) = &path {
        // best effort; a failed write only costs a recompile next time
        if let Some(dir) = p.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, ptx.to_src()).is_ok() {
            let _ = std::fs::rename(&tmp, p);
        }
    }
    Ok((ptx, false))
}

/// The kernels of a module's entry list: a name ending in `_n` stands for its
/// row-count variants `_n1` … `_n8`.
pub(super) fn entry_names(entries: &[&str]) -> Vec<String> {
    let mut names = Vec::new();
    for e in entries {
        if e.ends_with("_n") {
            names.extend((1..=8).map(|n| format!("{e}{n}")));
        } else {
            names.push(e.to_string());
        }
    }
    names
}

/// The persistent step's source: every kernel module it runs, then kernels/persistent.cu.
pub(super) fn persistent_source() -> Result<String> {
    let mut src = String::new();
    for name in persistent::MODULES {
        let (_, s, _) = SOURCES
            .iter()
            .find(|(m, _, _)| m == name)
            .ok_or_else(|| CudaError::Shape(format!("persistent step: no kernel module {name}")))?;
        src.push_str(&format!("#line 1 \"kernels/{name}.cu\"\n{s}\n"));
    }
    src.push_str(&format!("#line 1 \"kernels/persistent.cu\"\n{}", persistent::SOURCE));
    Ok(src)
}

/// NVRTC options of a persistent step for models of `head_dim`, `blocks_per_sm` blocks per
/// SM and steps of up to `rows` rows. The ordering between instructions: a grid-wide
/// barrier after each (default; on the H100 5.13 ms per Qwen3-30B-A3B step against 5.39
/// with completion counters) or per-instruction completion counters
/// (`KAIROS_CUDA_PK_SYNC=counters`).
pub(super) fn persistent_opts(head_dim: usize, blocks_per_sm: u32, rows: usize, counters: bool) -> Vec<String> {
    let mut opts = vec![
        "-DKAIROS_PERSISTENT".to_string(),
        format!("-DPK_HEAD_DIM={head_dim}"),
        format!("-DPK_MIN_BLOCKS={blocks_per_sm}"),
        format!("-DPK_MAX_N={rows}"),
    ];
    if !counters {
        opts.push("-DPK_BARRIER".into());
    }
    opts
}

#[cfg(test)]
mod resources {
    use super::*;
    use crate::backend::cuda::SOURCES;

    /// Registers, spills and shared memory of every kernel as ptxas reports them for
    /// sm_90 (NVRTC compiles to a cubin here; no GPU needed). Printed, never asserted:
    /// `KAIROS_NVRTC_RESOURCES=1 LD_LIBRARY_PATH=$(scripts/fetch_nvrtc.sh) cargo test
    /// --release --features cuda --lib kernel_resources -- --nocapture`.
    #[test]
    fn kernel_resources_sm90() {
        // SAFETY: only asks the dynamic loader whether the library can be opened.
        if std::env::var_os("KAIROS_NVRTC_RESOURCES").is_none() || !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            eprintln!("skipping: set KAIROS_NVRTC_RESOURCES=1 with NVRTC on LD_LIBRARY_PATH");
            return;
        }
        for (module, src, _) in SOURCES {
            let full = std::ffi::CString::new(format!("{COMMON}\n#line 1 \"kernels/{module}.cu\"\n{src}")).expect("no NUL");
            let prog = cudarc::nvrtc::result::create_program(&full, None).expect("program");
            let mut opts: Vec<String> =
                ["--gpu-architecture=sm_90", "--std=c++17", "--ptxas-options=-v"].map(String::from).to_vec();
            if let Ok(defs) = std::env::var("KAIROS_NVRTC_DEFINES") {
                opts.extend(defs.split_whitespace().map(|d| format!("-D{d}")));
            }
            // SAFETY: `prog` was just created and is destroyed below.
            let log = unsafe {
                let r = cudarc::nvrtc::result::compile_program(prog, &opts);
                let log = cudarc::nvrtc::result::get_program_log(prog).expect("log");
                let _ = cudarc::nvrtc::result::destroy_program(prog);
                r.unwrap_or_else(|e| panic!("kernels/{module}.cu: {e:?}"));
                log
            };
            let text: String = log.iter().take_while(|&&c| c != 0).map(|&c| c as u8 as char).collect();
            // per kernel: "Function properties for K", then "N bytes stack frame, N bytes spill
            // stores, N bytes spill loads", then "Used N registers, ..., N bytes smem"
            let (mut name, mut frame) = (String::new(), String::new());
            for line in text.lines() {
                if let Some(k) = line.split("Function properties for ").nth(1) {
                    (name, frame) = (k.trim().to_string(), String::new());
                } else if line.contains("stack frame") {
                    frame = line.trim_start_matches(|c: char| !c.is_ascii_digit()).to_string();
                } else if let Some(used) = line.split("Used ").nth(1) {
                    println!("{module:<10} {name:<24} {used:<64} {frame}");
                }
            }
        }
    }
}
