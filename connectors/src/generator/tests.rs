use super::*;

fn cfg(kind: GeneratorKind, seed: u64, rate: f64) -> GeneratorConfig {
    GeneratorConfig { kind, rate: 0.0, count: None, seed, anomaly_rate: rate, entities: None, start_time_ms: default_start() }
}

fn take(kind: GeneratorKind, seed: u64, rate: f64, n: usize) -> Vec<Generated> {
    let mut g = build(&cfg(kind, seed, rate)).expect("build");
    (0..n).map(|_| g.next_event()).collect()
}

const KINDS: [GeneratorKind; 3] = [GeneratorKind::Fraud, GeneratorKind::Market, GeneratorKind::Agent];

#[test]
fn deterministic_per_seed() {
    for k in KINDS {
        assert_eq!(take(k, 7, 0.1, 500), take(k, 7, 0.1, 500), "{k:?}");
        assert_ne!(take(k, 7, 0.1, 500), take(k, 8, 0.1, 500), "{k:?}");
    }
}

fn fields(kind: GeneratorKind) -> &'static [&'static str] {
    match kind {
        GeneratorKind::Fraud => &[
            "txn_id", "card_id", "ts_ms", "amount", "currency", "merchant", "mcc", "merchant_category",
            "channel", "country", "city", "local_hour", "card_home_country", "card_avg_amount_30d",
            "card_txns_last_10min", "prev_txn_country", "prev_txn_minutes_ago",
        ],
        GeneratorKind::Market => &["symbol", "ts_ms", "price", "prev_price", "change_pct", "volume", "bid", "ask", "vwap_5m"],
        GeneratorKind::Agent => &["agent_id", "session_id", "seq", "ts_ms", "type"],
    }
}

#[test]
fn valid_json_with_documented_fields() {
    for k in KINDS {
        for (i, g) in take(k, 1, 0.2, 2000).into_iter().enumerate() {
            let ev = to_event(g.clone(), "t", i as i64);
            let v: serde_json::Value = serde_json::from_slice(&ev.payload).expect("valid JSON");
            let obj = v.as_object().expect("object");
            for f in fields(k) {
                assert!(obj.contains_key(*f), "{k:?} event {i} lacks {f}: {v}");
            }
            let key_field = match k {
                GeneratorKind::Fraud => "card_id",
                GeneratorKind::Market => "symbol",
                GeneratorKind::Agent => "agent_id",
            };
            assert_eq!(obj[key_field].as_str(), Some(g.key.as_str()));
            assert_eq!(ev.header(HEADER_GEN_PATTERN), Some(g.pattern.as_bytes()));
            if k == GeneratorKind::Fraud {
                let amount = obj["amount"].as_f64().expect("amount");
                assert!(amount > 0.0);
                assert!((0..24).contains(&obj["local_hour"].as_i64().expect("hour")));
                match g.pattern {
                    "card_testing" => assert!(amount < 3.0),
                    "night_high_risk" => assert!(obj["local_hour"].as_i64() <= Some(5), "{v}"),
                    "large_amount" => assert!(amount >= 10.0 * obj["card_avg_amount_30d"].as_f64().unwrap() - 0.01),
                    "geo_impossible" => {
                        assert_ne!(obj["country"], obj["prev_txn_country"]);
                        assert!(obj["prev_txn_minutes_ago"].as_i64().unwrap() < 40);
                    }
                    _ => {}
                }
            }
        }
    }
}

#[test]
fn anomalies_at_known_rate() {
    for k in KINDS {
        for rate in [0.0, 0.05, 0.2] {
            let n = 20_000;
            let evs = take(k, 3, rate, n);
            let frac = evs.iter().filter(|g| g.pattern != "none").count() as f64 / n as f64;
            assert!((frac - rate).abs() < 0.02 + rate * 0.15, "{k:?}: rate {rate}, got {frac}");
        }
        // every pattern shows up
        let evs = take(k, 3, 0.2, 20_000);
        let want: &[&str] = match k {
            GeneratorKind::Fraud => &["card_testing", "geo_impossible", "night_high_risk", "large_amount"],
            GeneratorKind::Market => &["price_jump"],
            GeneratorKind::Agent => &["prompt_injection", "dangerous_tool_call", "error_loop"],
        };
        for p in want {
            assert!(evs.iter().any(|g| g.pattern == *p), "{k:?} never produced {p}");
        }
    }
}

#[tokio::test]
async fn source_respects_count_and_rate() {
    let mut c = cfg(GeneratorKind::Market, 1, 0.05);
    c.count = Some(20);
    c.rate = 200.0;
    let t = std::time::Instant::now();
    let mut h = start(c, 4, Shutdown::new()).expect("start");
    let mut n = 0;
    while let Some(e) = h.events.recv().await {
        assert_eq!(e.origin.offset, n);
        n += 1;
    }
    assert_eq!(n, 20);
    assert!(t.elapsed() >= std::time::Duration::from_millis(90), "rate not applied");
    assert_eq!(h.join.await.expect("join").expect("ok").delivered, 20);
}

#[test]
fn config_rejects_unknown_fields() {
    let ok: crate::SourceConfig = serde_json::from_str(r#"{"type":"generator","kind":"fraud","rate":10}"#).expect("ok");
    assert!(matches!(ok, crate::SourceConfig::Generator(_)));
    let bad = serde_json::from_str::<crate::SourceConfig>(r#"{"type":"generator","kind":"fraud","rat":10}"#);
    assert!(bad.is_err());
}
