//! Integration tests against a real Kafka-protocol broker (noida-db) that
//! each test starts on its own port and data dir.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use kairos_connectors::kafka::{run_exactly_once, ExactlyOnceConfig, KafkaSink, KafkaSource};
use kairos_connectors::{OutRecord, Shutdown, Sink};

const T: Duration = Duration::from_secs(25);

fn sink(b: &Broker, out: &str) -> Arc<dyn Sink> {
    Arc::new(KafkaSink::new(&sink_config(b, out, Some("dlq"))).expect("sink"))
}

/// N events through source → echo → sink: N outputs, keys and headers
/// preserved; the committed offset only covers acked events, and a new
/// consumer of the group resumes right after the last acked one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roundtrip_and_commit_after_ack() {
    let t0 = Instant::now();
    let b = Broker::start();
    create_topic(&b, "in", 1).await;
    create_topic(&b, "out", 1).await;
    create_topic(&b, "dlq", 1).await;
    let p = producer(&b);
    produce_inputs(&p, "in", 0, 200).await;
    let out = sink(&b, "out");

    // phase 1: answer and ack 0..120, take 120..130 without acking, stop.
    let sd = Shutdown::new();
    let mut cfg = source_config(&b, "in", "g1");
    cfg.shutdown_drain_ms = 300; // 10 events stay unacked on purpose
    let mut h = KafkaSource::start(cfg, 10, sd.clone()).expect("source");
    let mut unacked = 0;
    while let Some(ev) = tokio::time::timeout(T, h.events.recv()).await.expect("event in time") {
        if ev.origin.offset < 120 {
            out.send(echo(&ev)).await.expect("send");
            if ev.origin.offset % 50 == 0 {
                out.send(OutRecord::dlq_for(&ev, "test reason")).await.expect("send dlq");
            }
            h.acker.ack(&ev.origin);
        } else {
            unacked += 1;
            if unacked == 10 {
                sd.trigger();
            }
        }
    }
    h.join.await.expect("join").expect("source ok");
    assert_eq!(committed(&b, "g1", "in", 0), Some(120), "commit must stop at the first unacked offset");

    // phase 2: same group resumes at 120 and finishes.
    let sd2 = Shutdown::new();
    let mut h2 = KafkaSource::start(source_config(&b, "in", "g1"), 10, sd2.clone()).expect("source");
    let first = tokio::time::timeout(T, h2.events.recv()).await.expect("event in time").expect("event");
    assert_eq!(first.origin.offset, 120, "resumed at the wrong offset");
    out.send(echo(&first)).await.expect("send");
    h2.acker.ack(&first.origin);
    let mut n = 1;
    while n < 80 {
        let ev = tokio::time::timeout(T, h2.events.recv()).await.expect("event in time").expect("event");
        out.send(echo(&ev)).await.expect("send");
        h2.acker.ack(&ev.origin);
        n += 1;
    }
    sd2.trigger();
    while h2.events.recv().await.is_some() {}
    h2.join.await.expect("join").expect("source ok");
    assert_eq!(committed(&b, "g1", "in", 0), Some(200));

    let outs = read_outputs(&b, "out", 200, T, Duration::from_millis(300)).await;
    assert_eq!(outs.len(), 200, "exactly one output per input here");
    assert_eq!(answered(&outs), (0..200).collect());
    for o in &outs {
        let i = o.payload["input"]["i"].as_u64().expect("i");
        assert_eq!(o.key.as_deref(), Some(format!("k{}", i % 17).as_str()), "key preserved");
        assert!(o.headers.contains_key("traceparent"), "traceparent passed through");
        assert_eq!(o.headers.get("kairos-deadline-ms").map(String::as_str), Some("1700000000000"));
        assert_eq!(o.headers.get("kairos-source"), Some(&format!("in/0/{i}")));
    }
    let dlq = read_outputs(&b, "dlq", 3, T, Duration::from_millis(200)).await;
    assert_eq!(dlq.len(), 3);
    assert!(dlq.iter().all(|o| o.headers.get("kairos-dlq-reason").map(String::as_str) == Some("test reason")));
    eprintln!("roundtrip_and_commit_after_ack: {:?}", t0.elapsed());
}

/// A stalled pipeline: partitions are paused, the source holds at most the
/// channel's worth, the consumer stays in its group past session.timeout,
/// then everything flows again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_pauses_without_eviction() {
    let t0 = Instant::now();
    let b = Broker::start();
    create_topic(&b, "in", 2).await;
    create_topic(&b, "out", 1).await;
    let p = producer(&b);
    produce_inputs(&p, "in", 0, 300).await;
    let out = sink(&b, "out");
    let cap = 8;
    let sd = Shutdown::new();
    let mut cfg = source_config(&b, "in", "g2");
    cfg.read_ahead_events = 100;
    let (mut h, stats) = KafkaSource::start_with_stats(cfg, cap, sd.clone()).expect("source");
    for _ in 0..10 {
        let ev = tokio::time::timeout(T, h.events.recv()).await.expect("event in time").expect("event");
        out.send(echo(&ev)).await.expect("send");
        h.acker.ack(&ev.origin);
    }
    // stall for longer than session.timeout.ms (6 s)
    wait_for("partitions paused", Duration::from_secs(5), || stats.paused.load(Ordering::SeqCst)).await;
    let stall = Instant::now();
    while stall.elapsed() < Duration::from_secs(7) {
        let d = stats.get(&stats.delivered);
        assert!(d <= 10 + cap as u64, "source ran ahead of a stalled pipeline: {d} delivered");
        let r = stats.get(&stats.read_ahead);
        assert!(r <= 200, "read-ahead not bounded while paused: {r}");
        assert!(stats.paused.load(Ordering::SeqCst), "resumed while stalled: {stats:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let worker = spawn_echo(h, out, Duration::ZERO);
    let outs = read_until_answered(&b, "out", 300, T, Duration::from_millis(200)).await;
    assert_eq!(answered(&outs).len(), 300, "all inputs answered after the stall");
    assert_eq!(stats.get(&stats.revocations), 0, "consumer was evicted from the group");
    assert_eq!(stats.get(&stats.assignments), 1);
    assert!(stats.get(&stats.pauses) >= 1);
    sd.trigger();
    let (_, h) = worker.await.expect("worker");
    h.join.await.expect("join").expect("source ok");
    eprintln!("stall_pauses_without_eviction: {:?}", t0.elapsed());
}

/// Two consumers in one group; one leaves mid-stream. Every input is
/// answered, and the remaining consumer finishes in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_leaves_mid_stream_no_loss() {
    let t0 = Instant::now();
    let b = Broker::start();
    create_topic(&b, "in", 4).await;
    create_topic(&b, "out", 1).await;
    let p = producer(&b);
    produce_inputs(&p, "in", 0, 200).await;
    let (sd_a, sd_b) = (Shutdown::new(), Shutdown::new());
    let (ha, sa) = KafkaSource::start_with_stats(source_config(&b, "in", "g3"), 16, sd_a.clone()).expect("a");
    let (hb, sb) = KafkaSource::start_with_stats(source_config(&b, "in", "g3"), 16, sd_b.clone()).expect("b");
    let wa = spawn_echo(ha, sink(&b, "out"), Duration::from_millis(10));
    let wb = spawn_echo(hb, sink(&b, "out"), Duration::from_millis(10));
    // wait until b has done some work, keep producing, then b leaves
    wait_for("consumer b got work", T, || sb.get(&sb.acked) >= 10).await;
    produce_inputs(&p, "in", 200, 400).await;
    sd_b.trigger();
    let (nb, hb) = wb.await.expect("worker b");
    hb.join.await.expect("join b").expect("b ok");
    assert!(nb >= 10);
    let outs = read_until_answered(&b, "out", 400, T, Duration::from_millis(200)).await;
    let got = answered(&outs);
    let missing: Vec<u64> = (0..400).filter(|i| !got.contains(i)).collect();
    assert!(missing.is_empty(), "unanswered inputs: {missing:?}; a: {sa:?}; b: {sb:?}");
    assert!(sa.get(&sa.assignments) >= 2, "a should have been re-assigned after b left");
    sd_a.trigger();
    let (_, ha) = wa.await.expect("worker a");
    ha.join.await.expect("join a").expect("a ok");
    eprintln!("member_leaves_mid_stream_no_loss: {:?} ({} outputs for 400 inputs)", t0.elapsed(), outs.len());
}

/// The broker is killed and restarted on the same data dir mid-stream:
/// every input is still answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_no_loss() {
    let t0 = Instant::now();
    let mut b = Broker::start();
    create_topic(&b, "in", 2).await;
    create_topic(&b, "out", 1).await;
    let p = producer(&b);
    produce_inputs(&p, "in", 0, 150).await;
    let sd = Shutdown::new();
    let (h, stats) = KafkaSource::start_with_stats(source_config(&b, "in", "g4"), 16, sd.clone()).expect("source");
    let sent = Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let w = spawn_echo_logged(h, sink(&b, "out"), Duration::from_millis(5), sent.clone());
    wait_for("some progress", T, || stats.get(&stats.acked) >= 40).await;
    b.restart();
    produce_inputs(&p, "in", 150, 300).await;
    wait_for("the pipeline to answer all 300 inputs", T, || {
        sent.lock().unwrap_or_else(|e| e.into_inner()).len() == 300
    })
    .await;
    let outs = read_until_answered(&b, "out", 300, Duration::from_secs(5), Duration::from_millis(200)).await;
    let got = answered(&outs);
    let missing: Vec<u64> = (0..300).filter(|i| !got.contains(i)).collect();
    // noida-db 0.2.3 can lose the last few records it acknowledged (acks=all)
    // just before it stops: librdkafka then reports OutOfOrderSequenceNumber
    // for the next idempotent batch. Those are the broker's loss, not the
    // pipeline's: every input must have been answered by an acked send.
    let ins = read_outputs_iso(&b, "in", 300, Duration::from_secs(5), Duration::from_millis(100), "read_uncommitted").await;
    let in_set: std::collections::BTreeSet<u64> = ins.iter().filter_map(|o| o.payload["i"].as_u64()).collect();
    assert_eq!(in_set.len(), 300, "inputs lost by the broker");
    let sent = sent.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let never_sent: Vec<u64> = (0..300).filter(|i| !sent.contains(i)).collect();
    assert!(never_sent.is_empty(), "inputs the pipeline never answered: {never_sent:?}; stats {stats:?}");
    if !missing.is_empty() {
        eprintln!("broker_restart_no_loss: noida-db lost {} acknowledged output(s) across its restart: {missing:?}", missing.len());
    }
    assert!(missing.len() <= 10, "too many acked outputs lost by the broker: {missing:?}");
    sd.trigger();
    let (_, h) = w.await.expect("worker");
    h.join.await.expect("join").expect("source ok");
    eprintln!("broker_restart_no_loss: {:?} ({} outputs for 300 inputs)", t0.elapsed(), outs.len());
}

/// Run the exactly-once loop over 100 inputs; with `abort`, the first
/// batch's transaction fails (a DLQ record without a DLQ topic) and is
/// aborted and re-read.
async fn eos_run(abort: bool) -> (Broker, kairos_connectors::kafka::EosStats) {
    let b = Broker::start();
    create_topic(&b, "in", 2).await;
    create_topic(&b, "out", 1).await;
    let p = producer(&b);
    produce_inputs(&p, "in", 0, 100).await;
    let src = source_config(&b, "in", "g5");
    // no DLQ topic: a DLQ record fails its transaction (used to force one abort)
    let snk = sink_config(&b, "out", None);
    let eos: ExactlyOnceConfig =
        serde_json::from_value(serde_json::json!({"transactional_id": "kairos-test-1", "max_batch": 20})).expect("eos config");
    let sd = Shutdown::new();
    let sd2 = sd.clone();
    let mut first = abort;
    let runner = tokio::spawn(async move {
        run_exactly_once(&src, &snk, &eos, sd2, move |batch| {
            let fail = std::mem::replace(&mut first, false);
            async move {
                let mut recs: Vec<OutRecord> = batch.iter().map(echo).collect();
                if fail {
                    recs.push(OutRecord::dlq_for(&batch[0], "forced failure"));
                }
                recs
            }
        })
        .await
    });
    wait_for("input offsets committed", T, || {
        committed(&b, "g5", "in", 0).unwrap_or(0) + committed(&b, "g5", "in", 1).unwrap_or(0) == 100
    })
    .await;
    sd.trigger();
    let stats = tokio::time::timeout(T, runner).await.expect("eos loop stopped").expect("join").expect("eos ok");
    assert_eq!(stats.events, 100);
    assert!(stats.committed_transactions >= 1);
    assert_eq!(stats.aborted_transactions, abort as u64);
    (b, stats)
}

/// Transactions: outputs and input offsets commit together; a
/// read_committed reader sees each input answered exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_transactions() {
    let t0 = Instant::now();
    let (b, stats) = eos_run(false).await;
    let outs = read_outputs(&b, "out", 100, T, Duration::from_millis(1000)).await;
    assert_eq!(answered(&outs), (0..100).collect(), "every input answered");
    assert_eq!(outs.len(), 100, "duplicates visible to a read_committed reader");
    eprintln!("exactly_once_transactions: {:?} ({stats:?})", t0.elapsed());
}

/// A failed transaction is aborted and its batch re-read: every input is
/// answered by a committed transaction and the offsets end at the end.
/// noida-db 0.2.3 stalls read_committed readers after an abort (its last
/// stable offset does not move past the aborted transaction), so this reads
/// uncommitted and checks the extra records are at most one batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_aborted_batch_is_retried() {
    let t0 = Instant::now();
    let (b, stats) = eos_run(true).await;
    let outs = read_outputs_iso(&b, "out", 120, T, Duration::from_millis(500), "read_uncommitted").await;
    assert_eq!(answered(&outs), (0..100).collect(), "every input answered");
    assert!(outs.len() <= 100 + 20, "more than the aborted batch duplicated: {}", outs.len());
    eprintln!("exactly_once_aborted_batch_is_retried: {:?} ({stats:?}, {} records incl. aborted)", t0.elapsed(), outs.len());
}
