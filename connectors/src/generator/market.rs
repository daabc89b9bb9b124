//! Market ticks with price jumps.

use std::collections::VecDeque;

use rand::rngs::StdRng;
use rand::Rng;
use serde_json::json;

use super::{round2, start_probability, EventGenerator, Generated};

const SYMBOLS: &[&str] = &[
    "AAPL", "MSFT", "NVDA", "AMZN", "GOOG", "META", "TSLA", "AMD", "INTC", "NFLX", "ORCL", "CRM",
    "ADBE", "QCOM", "AVGO", "TXN", "IBM", "SHOP", "UBER", "PYPL",
];

struct Sym {
    name: String,
    price: f64,
    recent: VecDeque<(f64, f64)>, // (price, volume) of the last ticks
}

/// Market-tick generator (see [`super::GeneratorKind::Market`]).
pub struct MarketGenerator {
    rng: StdRng,
    syms: Vec<Sym>,
    jump_p: f64,
    clock_ms: i64,
}

impl MarketGenerator {
    pub fn new(mut rng: StdRng, entities: usize, rate: f64, start_ms: i64) -> Self {
        let syms = (0..entities)
            .map(|i| {
                let name = match SYMBOLS.get(i) {
                    Some(s) => s.to_string(),
                    None => format!("SYM{i}"),
                };
                Sym { name, price: round2(rng.gen_range(20.0..800.0)), recent: VecDeque::new() }
            })
            .collect();
        MarketGenerator { rng, syms, jump_p: start_probability(rate, 1.0), clock_ms: start_ms }
    }
}

impl EventGenerator for MarketGenerator {
    fn next_event(&mut self) -> Generated {
        self.clock_ms += self.rng.gen_range(1..=200);
        let i = self.rng.gen_range(0..self.syms.len());
        let jump = self.rng.gen_bool(self.jump_p);
        let ret = if jump {
            let m = self.rng.gen_range(0.03..0.12);
            if self.rng.gen_bool(0.5) { m } else { -m }
        } else {
            self.rng.gen_range(-0.002..0.002)
        };
        let volume = if jump { self.rng.gen_range(5_000.0..50_000.0f64) } else { self.rng.gen_range(100.0..3_000.0f64) }.round();
        let s = &mut self.syms[i];
        let prev = s.price;
        s.price = round2((prev * (1.0 + ret)).max(0.01));
        s.recent.push_back((s.price, volume));
        if s.recent.len() > 50 {
            s.recent.pop_front();
        }
        let (pv, v): (f64, f64) = s.recent.iter().fold((0.0, 0.0), |a, (p, v)| (a.0 + p * v, a.1 + v));
        let spread = (s.price * self.rng.gen_range(0.0001..0.0008)).max(0.01);
        let payload = json!({
            "symbol": s.name,
            "ts_ms": self.clock_ms,
            "price": s.price,
            "prev_price": prev,
            "change_pct": round2((s.price / prev - 1.0) * 100.0),
            "volume": volume,
            "bid": round2(s.price - spread / 2.0),
            "ask": round2(s.price + spread / 2.0),
            "vwap_5m": round2(pv / v.max(1.0)),
        });
        Generated { key: s.name.clone(), payload, pattern: if jump { "price_jump" } else { "none" } }
    }
}
