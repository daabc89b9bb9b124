//! The `kairos` binary Kafka to Kafka, against a real Kafka-protocol broker
//! (noida-db) that each test starts on its own port and data dir. The model
//! is the tiny llama fixture so the engine is fast; what is tested is
//! delivery: every input gets a verdict or a DLQ record, keyed and headed as
//! DESIGN.md says, through crashes, broker restarts, members leaving and
//! overload.

mod kafka_support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use kafka_support::*;

/// Upper bound on waiting for a pipeline to answer everything (the fixture
/// answers ~40-200 events/s here depending on the machine's load).
const T: Duration = Duration::from_secs(60);

async fn broker_with_topics(partitions: i32) -> Broker {
    let b = Broker::start();
    create_topic(&b, "in", partitions).await;
    create_topic(&b, "out", 2).await;
    create_topic(&b, "dlq", 1).await;
    b
}

/// N events in, N records out: one verdict per valid event, one DLQ record
/// per malformed one, keys and headers as specified, offsets committed to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_every_event_gets_one_verdict_or_dlq_record() {
    let t0 = Instant::now();
    let b = broker_with_topics(3).await;
    let n = 400;
    let placed = produce_events(&producer(&b), 0, n, 40).await;
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup { group: "g-count".into(), ..Setup::default() };
    let cfg = write_config(dir.path(), &b, &setup);
    let mut k = Kairos::start(&cfg, &dir.path().join("kairos.log"), &["--max-events", &n.to_string()]);
    let st = k.wait(T).unwrap_or_else(|| panic!("kairos did not finish {n} events; log:\n{}", k.stderr()));
    assert!(st.success(), "kairos failed: {}", k.stderr());

    let (verdicts, dlq) = (snapshot(&b, "out"), snapshot(&b, "dlq"));
    let bad = (0..n).filter(|&i| Kind::of(i) != Kind::Valid).count();
    assert_eq!(dlq.len(), bad, "DLQ records");
    assert_eq!(verdicts.len(), n as usize - bad, "verdict records");
    for r in &verdicts {
        check_verdict(r, &placed[&r.input().expect("id")]);
    }
    for r in &dlq {
        check_dlq(r, &placed[&r.input().expect("id")]);
    }
    let a = answers(&verdicts, &dlq);
    assert!(missing(&a, 0..n).is_empty() && duplicates(&a) == 0, "one answer per input: {a:?}");
    let ends = end_offsets(&b, "in");
    let done = committed_all(&b, "g-count", 3);
    for (p, end) in &ends {
        assert_eq!(done[p], Some(*end), "partition {p} committed to the end");
    }
    eprintln!("kafka_every_event_gets_one_verdict_or_dlq_record: {:?} ({} verdicts, {} DLQ)", t0.elapsed(), verdicts.len(), dlq.len());
}

/// Duplicates per input, and the check that each one lies in the window
/// the crash left uncommitted: a duplicated input's offset is at or past
/// the committed offset of its partition at the time of the crash.
fn duplicates_in_window(a: &std::collections::BTreeMap<u64, usize>, placed: &std::collections::BTreeMap<u64, Placed>,
    at_crash: &std::collections::BTreeMap<i32, Option<i64>>) -> usize {
    for (i, &c) in a {
        if c > 1 {
            let p = placed[i];
            let from = at_crash.get(&p.partition).copied().flatten().unwrap_or(0);
            assert!(p.offset >= from, "input {i} ({p:?}) answered twice though committed before the crash ({from})");
        }
    }
    duplicates(a)
}

/// kill -9 mid-stream, then a restart of the same group: every input has a
/// verdict or DLQ record; the duplicates are exactly re-answers of inputs
/// past the committed offsets, at most the in-flight window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_kill_9_then_restart_loses_nothing() {
    let t0 = Instant::now();
    let b = broker_with_topics(2).await;
    let n = 1500;
    let placed = produce_events(&producer(&b), 0, n, 40).await;
    let dir = tempfile::tempdir().unwrap();
    let mut setup = Setup { group: "g-kill".into(), ..Setup::default() };
    // Static membership: the restarted process takes the dead one's place
    // at once. noida-db 0.2.3 never expires a member that died without
    // leaving (it stays the group leader, every later JoinGroup gets the
    // old generation and SyncGroup fails), so a restart with a new dynamic
    // member id would stall forever there; Apache Kafka expires it after
    // session.timeout.ms.
    setup.consumer_extra.push(("group.instance.id", "kairos-0".into()));
    let cfg = write_config(dir.path(), &b, &setup);
    let mut first = Kairos::start(&cfg, &dir.path().join("first.log"), &[]);
    wait_for("300 outputs before the crash", T, || count(&b, "out") + count(&b, "dlq") >= 300).await;
    first.kill9();
    let out_at_kill = count(&b, "out") + count(&b, "dlq");
    assert!(out_at_kill < n as i64, "the crash came after the end ({out_at_kill} outputs): not mid-stream");
    let at_crash = committed_all(&b, "g-kill", 2);

    let mut second = Kairos::start(&cfg, &dir.path().join("second.log"), &[]);
    let ids: BTreeSet<u64> = (0..n).collect();
    let (verdicts, dlq) = wait_answered(&b, &ids, T).await;
    assert!(second.term(Duration::from_secs(20)).success(), "second run: {}", second.stderr());
    let a = answers(&verdicts, &dlq);
    let lost = missing(&a, 0..n);
    assert!(lost.is_empty(), "inputs without a verdict or DLQ record: {}\n{}", brief(&lost), second.stderr());
    let dups = duplicates_in_window(&a, &placed, &at_crash);
    // The window: what one process holds between delivery and commit. The
    // read-ahead is not yet handed on, so it is re-read, not re-answered;
    // it is added to keep the bound the brief's (in-flight + read-ahead).
    let bound = setup.inflight_cap() + setup.read_ahead;
    assert!(dups <= bound, "{dups} duplicates > in-flight window {bound}; committed at crash {at_crash:?}");
    eprintln!(
        "kafka_kill_9_then_restart_loses_nothing: {:?}; {out_at_kill} outputs at the kill, committed then {at_crash:?}, {dups} duplicates (bound {bound})",
        t0.elapsed()
    );
}

/// The broker is stopped and started again on the same port and data dir
/// mid-stream, with more events produced after it is back. Every input the
/// broker kept is answered. noida-db 0.2.3 can drop the last records it
/// acknowledged before it stopped; such a loss is told apart from a pipeline
/// loss by the group's committed offset (kairos commits an input only after
/// its output was acknowledged) and reported record by record.
/// (This test found the source's pause flag going stale across a lost
/// assignment: partitions paused by backpressure came back paused.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_broker_restart_mid_stream_loses_nothing() {
    let t0 = Instant::now();
    let mut b = broker_with_topics(2).await;
    let (n1, n) = (800, 1300);
    let p = producer(&b);
    let mut placed = produce_events(&p, 0, n1, 40).await;
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup { group: "g-restart".into(), ..Setup::default() };
    let cfg = write_config(dir.path(), &b, &setup);
    let mut k = Kairos::start(&cfg, &dir.path().join("kairos.log"), &[]);
    wait_for("200 outputs before the broker restart", T, || count(&b, "out") + count(&b, "dlq") >= 200).await;
    let before = count(&b, "out") + count(&b, "dlq");
    b.restart();
    assert!(before < n1 as i64, "the restart came after the end: not mid-stream");
    placed.extend(produce_events(&p, n1, n, 40).await);

    let ids: BTreeSet<u64> = (0..n).collect();
    let (verdicts, dlq) = wait_answered(&b, &ids, T).await;
    // Let the last commits land before reading them.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(k.term(Duration::from_secs(20)).success(), "kairos: {}", k.stderr());
    let a = answers(&verdicts, &dlq);

    // Inputs the broker itself lost (acked to the test's producer, gone after the restart).
    let inputs: BTreeSet<u64> = snapshot(&b, "in").iter().filter_map(Rec::input).collect();
    let inputs_lost: Vec<u64> = (0..n).filter(|i| !inputs.contains(i)).collect();
    let done = committed_all(&b, "g-restart", 2);
    let (mut acked_then_lost, mut pipeline_lost) = (Vec::new(), Vec::new());
    for i in missing(&a, inputs.iter().copied()) {
        let pl = placed[&i];
        let committed = done[&pl.partition].unwrap_or(0);
        if committed > pl.offset {
            acked_then_lost.push((i, pl));
        } else {
            pipeline_lost.push((i, pl));
        }
    }
    if !inputs_lost.is_empty() || !acked_then_lost.is_empty() {
        eprintln!(
            "broker_restart_mid_stream_loses_nothing: noida-db lost acknowledged records across its restart: \
             inputs {inputs_lost:?}; outputs of inputs (kairos committed past them, so the broker had acked them) {acked_then_lost:?}"
        );
    }
    assert!(pipeline_lost.is_empty(), "inputs the pipeline never answered: {}; committed {done:?}\n{}", brief(&pipeline_lost), k.stderr());
    assert!(acked_then_lost.len() + inputs_lost.len() <= 10, "broker lost too much to call it a restart artefact");
    let answered = n as usize - inputs_lost.len() - acked_then_lost.len();
    assert!(answered >= n as usize - 10, "not vacuous: {answered} of {n} answered");
    eprintln!(
        "broker_restart_mid_stream_loses_nothing: {:?}; {before} outputs before the restart, {} duplicates, broker lost {} inputs and {} outputs",
        t0.elapsed(),
        duplicates(&a),
        inputs_lost.len(),
        acked_then_lost.len()
    );
}

/// Two kairos processes in one group over 4 partitions; once both answer,
/// one leaves (`term`: SIGTERM, else SIGKILL). The other takes over its
/// partitions and finishes every input: no loss, no stall.
///
/// After a SIGKILL the group coordinator must expire the dead member
/// (session.timeout.ms = 6 s) before the survivor gets its partitions.
/// noida-db 0.2.3 never does (the dead member stays the group's leader);
/// the test then says so and restarts the dead process with its static
/// `group.instance.id`, which takes its place at once, as a supervisor would.
async fn member_leaves(term: bool) {
    let t0 = Instant::now();
    let name = if term { "sigterm" } else { "kill9" };
    let b = broker_with_topics(4).await;
    let n = 1600;
    let placed = produce_events(&producer(&b), 0, n, 40).await;
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup { group: format!("g-two-{name}"), ..Setup::default() };
    let static_id = |id: &str| {
        let mut s = setup.clone();
        s.group = format!("{}-{id}", setup.group);
        if !term {
            // static members do not send LeaveGroup on close, so only the kill case uses them
            s.consumer_extra.push(("group.instance.id", id.to_string()));
        }
        s
    };
    let write = |id: &str| {
        // same group id, one config file per member
        let s = static_id(id);
        let p = write_config(dir.path(), &b, &s);
        let text = std::fs::read_to_string(&p).expect("config").replace(&s.group, &setup.group);
        std::fs::write(&p, text).expect("config");
        p
    };
    let (cfg_a, cfg_b) = (write("a"), write("b"));
    let mut a = Kairos::start(&cfg_a, &dir.path().join("a.log"), &[]);
    let mut bee = Kairos::start(&cfg_b, &dir.path().join("b.log"), &[]);
    wait_for("both members answering", T, || a.verdicts() >= 20 && bee.verdicts() >= 20).await;
    let at_leave = committed_all(&b, &setup.group, 4);
    let out_at_leave = count(&b, "out") + count(&b, "dlq");
    let mut restarted = None;
    if term {
        let st = bee.term(Duration::from_secs(20));
        assert!(st.success(), "b did not drain and exit 0 on SIGTERM: {}", bee.stderr());
    } else {
        bee.kill9();
    }
    assert!(out_at_leave < n as i64 - 300, "b left too late to matter ({out_at_leave} outputs)");
    let took_over = tokio::time::timeout(Duration::from_secs(14), async {
        while a.stderr().matches("partitions assigned").count() < 2 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .is_ok();
    if !took_over {
        assert!(!term, "a was not re-assigned within 14 s of b leaving the group: {}", a.stderr());
        eprintln!("member_leaves(kill9): the broker did not expire the killed member within 14 s; restarting it with its static id");
        restarted = Some(Kairos::start(&cfg_b, &dir.path().join("b2.log"), &[]));
    }
    let ids: BTreeSet<u64> = (0..n).collect();
    let (verdicts, dlq) = wait_answered(&b, &ids, T).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let done = committed_all(&b, &setup.group, 4);
    assert!(a.term(Duration::from_secs(20)).success(), "a: {}", a.stderr());
    if let Some(mut k) = restarted {
        assert!(k.term(Duration::from_secs(20)).success(), "restarted b: {}", k.stderr());
    }
    let ans = answers(&verdicts, &dlq);
    let lost = missing(&ans, 0..n);
    assert!(lost.is_empty(), "{name}: unanswered inputs {} (a stalled?)\na:\n{}", brief(&lost), a.stderr());
    let ends = end_offsets(&b, "in");
    for (p, end) in &ends {
        assert_eq!(done[p], Some(*end), "{name}: partition {p} not committed to the end: the survivor stalled");
    }
    let dups = duplicates_in_window(&ans, &placed, &at_leave);
    // b's window (kill) plus a's (the eager rebalance revokes a's partitions too).
    let bound = 2 * (setup.inflight_cap() + setup.read_ahead);
    assert!(dups <= bound, "{name}: {dups} duplicates > {bound}");
    let a_log = a.stderr();
    let b_log = bee.stderr();
    let warned: Vec<&str> = a_log
        .lines()
        .chain(b_log.lines())
        .filter(|l| (l.contains("WARN") || l.contains("revoked")) && !l.contains("CONFWARN"))
        .collect();
    eprintln!(
        "member_leaves({name}): {:?}; {out_at_leave} outputs when b left, taken over by a: {took_over}, {dups} duplicates (bound {bound}); warnings and revokes: {warned:#?}",
        t0.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_member_leaves_on_sigterm_no_loss_no_stall() {
    member_leaves(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_member_killed_no_loss_no_stall() {
    member_leaves(false).await;
}

/// Overload through Kafka: events arrive several times faster than the model
/// answers them, with a short budget. Every event is answered within its
/// budget plus a small slack (the late ones by the fallback), memory stays
/// bounded, and the consumer is never evicted from its group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_overload_answers_in_budget_with_bounded_memory() {
    let t0 = Instant::now();
    let b = broker_with_topics(2).await;
    let dir = tempfile::tempdir().unwrap();
    // ~1 KB events (~800 prompt tokens on the fixture): the model answers
    // some tens per second here; 250/s are offered.
    let (n, rate, pad) = (2500u64, 250.0, 1000);
    let setup = Setup {
        group: "g-overload".into(),
        // 300 ms left no model answer at all once in CI (a loaded 2-core box; most likely
        // every ~800-token event was shed as hopeless: its prefill estimate above what
        // the Kafka hop had left of the budget). 600 ms keeps the overload (the model
        // answers tens per second of the 250 offered) with room for model answers.
        budget_ms: 600,
        max_batch: 2,
        // librdkafka's own prefetch is bounded to 2 MB (default 64 MB)
        consumer_extra: vec![("queued.max.messages.kbytes", "2048".into()), ("max.poll.interval.ms", "8000".into())],
        ..Setup::default()
    };
    let cfg = write_config(dir.path(), &b, &setup);
    let k = Kairos::start(&cfg, &dir.path().join("kairos.log"), &[]);
    wait_for("kairos assigned its partitions", T, || k.stderr().contains("partitions assigned")).await;
    let rss_idle = k.rss_kb().expect("rss");
    let mut samples = Vec::new();
    let placed = produce_paced(&producer(&b), n, rate, pad, || samples.extend(k.rss_kb())).await;
    let ids: BTreeSet<u64> = (0..n).collect();
    let until = Instant::now() + T;
    let (verdicts, dlq) = loop {
        let (v, d) = wait_answered(&b, &ids, Duration::from_millis(1)).await;
        samples.extend(k.rss_kb());
        if answers(&v, &d).len() == ids.len() || Instant::now() > until {
            break (v, d);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let log = k.stderr();
    let mut k = k;
    assert!(k.term(Duration::from_secs(20)).success(), "{}", k.stderr());

    let a = answers(&verdicts, &dlq);
    assert!(missing(&a, 0..n).is_empty(), "unanswered: {}", brief(&missing(&a, 0..n)));
    let slack_ms = 250; // the sink write is after the stamp; this is thread wake-up on a loaded 2-core box
    let (mut fallbacks, mut late, mut worst) = (0, 0, 0u64);
    for r in &verdicts {
        check_verdict(r, &placed[&r.input().expect("id")]);
        let us: u64 = r.header("kairos-latency-us").parse().expect("latency");
        worst = worst.max(us);
        assert!(us <= (setup.budget_ms + slack_ms) * 1000, "answered after budget + slack: {us} us: {r:?}");
        if r.header("kairos-fallback") == "true" {
            fallbacks += 1;
            assert_eq!(r.payload, br#"{"decision":"review","score":0.5,"reason":"fallback"}"#.to_vec(), "{r:?}");
        }
        late += usize::from(r.header("kairos-deadline-met") == "false");
    }
    assert!(fallbacks > 0, "the model kept up with {rate} ev/s: not an overload");
    assert!(fallbacks < verdicts.len(), "no model verdict at all");
    // Membership: one assignment, no revoke while loaded (a poll loop that
    // stopped would be evicted after session.timeout.ms and re-assigned).
    assert_eq!(log.matches("partitions assigned").count(), 1, "rebalanced under load:\n{log}");
    assert_eq!(log.matches("partitions revoked").count(), 0, "revoked under load:\n{log}");
    // Memory: kairos holds at most the read-ahead, the source channel, the
    // engine queue, the scheduler heap and the batch (~120 events of ~1 KB
    // payload plus ~3 KB of prompt tokens and the parsed object each), the
    // KV of 2 sequences (~0.6 MB each on the fixture) and librdkafka's
    // prefetch (capped at 2 MB here): a few MB over idle. 32 MB leaves room
    // for allocator and thread arenas. Holding every event of this stream
    // would take ~2500 x 6 KB = 15 MB, so this bound alone does not tell a
    // leak of that size; the second-half check does: under a steady overload
    // a bounded pipeline plateaus, one that keeps per-event state grows with
    // the number of events.
    let peak = samples.iter().copied().max().unwrap_or(rss_idle);
    let half = samples.len() / 2;
    let peak_first = samples[..half].iter().copied().max().unwrap_or(rss_idle);
    let peak_second = samples[half..].iter().copied().max().unwrap_or(rss_idle);
    assert!(
        peak_second <= peak_first + 6 * 1024,
        "RSS still growing under steady overload: first half peak {peak_first} kB, second half {peak_second} kB"
    );
    let growth_mb = (peak.saturating_sub(rss_idle)) as f64 / 1024.0;
    assert!(growth_mb <= 32.0, "RSS grew {growth_mb:.1} MB under load (idle {rss_idle} kB, peak {peak} kB)");
    eprintln!(
        "overload_answers_in_budget_with_bounded_memory: {:?}; {} verdicts ({fallbacks} fallbacks, {late} late), {} DLQ, worst latency {:.1} ms, RSS idle {rss_idle} kB, peak {peak_first} kB in the first half and {peak_second} kB in the second ({} samples)",
        t0.elapsed(), verdicts.len(), dlq.len(), worst as f64 / 1000.0, samples.len()
    );
}
