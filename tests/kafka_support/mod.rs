//! Harness for the Kafka-to-Kafka tests of the `kairos` binary: a noida-db
//! broker per test (the connectors' test broker), input events with known
//! ids, `kairos run` as a child process that can be SIGTERMed or SIGKILLed,
//! and readers that snapshot the verdict and DLQ topics.
#![allow(dead_code)]

#[path = "../../connectors/tests/common/mod.rs"]
pub mod broker;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use broker::{committed, create_topic, producer, wait_for, Broker};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// Header the tests put on every input; kairos passes input headers through
/// to the verdict and DLQ records, so every output names its input.
pub const TEST_ID: &str = "test-i";

/// The verdict schema and prompt shared by the tests (fraud-shaped events).
const SCHEMA: &str = r#"
[event]
max_bytes = 2048
max_string_chars = 1200
required = { txn_id = "string", card_id = "string", amount = "number" }

[prompt]
system = "You are a card-fraud analyst. Decide allow, review or block for the transaction in the data."

[verdict]
fields = [
  { name = "decision", kind = "enum", values = ["allow", "review", "block"] },
  { name = "score", kind = "number", min = 0.0, max = 1.0, decimals = 2 },
  { name = "reason", kind = "string", max_chars = 40 },
]

[fallback]
verdict = { decision = "review", score = 0.5, reason = "fallback" }
"#;

/// Pipeline settings a test varies.
#[derive(Debug, Clone)]
pub struct Setup {
    pub group: String,
    pub budget_ms: u64,
    pub max_batch: usize,
    pub queue_capacity: usize,
    pub max_new_tokens: usize,
    pub read_ahead: usize,
    /// Extra librdkafka properties for the consumer.
    pub consumer_extra: Vec<(&'static str, String)>,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            group: "kairos".into(),
            budget_ms: 20_000,
            max_batch: 8,
            queue_capacity: 16,
            max_new_tokens: 24,
            read_ahead: 64,
            // The JoinGroup rebalance timeout. noida-db waits this long for a
            // member that died without leaving (kill -9) before it completes
            // the rebalance (librdkafka's default is 5 min; Apache Kafka
            // drops the member after session.timeout.ms already).
            consumer_extra: vec![("max.poll.interval.ms", "8000".into())],
        }
    }
}

impl Setup {
    /// Most events one kairos process holds delivered-but-unanswered: the
    /// source channel and the engine queue (`queue_capacity` each), the
    /// scheduler's heap (`queue_capacity`), the decoding batch, and the one
    /// event the intake loop holds. Their outputs may be written without the
    /// offset being committed, so they bound the duplicates of a crash.
    pub fn inflight_cap(&self) -> usize {
        3 * self.queue_capacity + self.max_batch + 1
    }
}

/// The tiny random llama fixture: the engine is fast and deterministic.
pub fn fixture_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama")
}

fn librdkafka_table(extra: &[(&str, String)]) -> String {
    let mut m: BTreeMap<String, String> = broker::test_librdkafka();
    for (k, v) in extra {
        m.insert((*k).to_string(), v.clone());
    }
    let body: Vec<String> = m.iter().map(|(k, v)| format!("{k:?} = {v:?}")).collect();
    format!("{{ {} }}", body.join(", "))
}

/// Write a Kafka-to-Kafka pipeline config (topics `in`, `out`, `dlq`).
pub fn write_config(dir: &Path, b: &Broker, s: &Setup) -> PathBuf {
    let cfg = format!(
        r#"name = "kafka-test"
[source]
type = "kafka"
brokers = "{brokers}"
topics = ["in"]
group_id = "{group}"
session_timeout_ms = 6000
heartbeat_interval_ms = 500
auto_commit_interval_ms = 100
shutdown_drain_ms = 5000
read_ahead_events = {read_ahead}
librdkafka = {src_lib}

[sink]
type = "kafka"
brokers = "{brokers}"
output_topic = "out"
dlq_topic = "dlq"
message_timeout_ms = 10000
librdkafka = {sink_lib}

[model]
path = {model:?}

[budget]
latency_ms = {budget}

[engine]
max_batch = {max_batch}
queue_capacity = {queue}
max_new_tokens = {max_new}
{SCHEMA}"#,
        brokers = b.brokers(),
        group = s.group,
        read_ahead = s.read_ahead,
        src_lib = librdkafka_table(&s.consumer_extra),
        sink_lib = librdkafka_table(&[]),
        model = fixture_model(),
        budget = s.budget_ms,
        max_batch = s.max_batch,
        queue = s.queue_capacity,
        max_new = s.max_new_tokens,
    );
    let p = dir.join(format!("{}.toml", s.group));
    std::fs::write(&p, cfg).expect("write config");
    p
}

/// What kind of input event `i` is: valid, or one malformed kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Valid,
    NotJson,
    NotUtf8,
    MissingField,
    WrongType,
    Oversized,
}

impl Kind {
    /// Every tenth event is malformed, cycling through the kinds.
    pub fn of(i: u64) -> Kind {
        if i % 10 != 7 {
            return Kind::Valid;
        }
        [Kind::NotJson, Kind::NotUtf8, Kind::MissingField, Kind::WrongType, Kind::Oversized][(i / 10 % 5) as usize]
    }

    /// The text the DLQ reason must contain.
    pub fn reason(self) -> &'static str {
        match self {
            Kind::Valid => "",
            Kind::NotJson => "not JSON",
            Kind::NotUtf8 => "not UTF-8",
            Kind::MissingField => "missing field `card_id`",
            Kind::WrongType => "field `amount` must be a number",
            Kind::Oversized => "oversized",
        }
    }
}

pub fn key_of(i: u64) -> String {
    format!("card-{}", i % 13)
}

/// Payload of input `i`; `pad` characters of note make events bigger.
pub fn payload_of(i: u64, pad: usize) -> Vec<u8> {
    let note: String = "lorem ipsum ".chars().cycle().take(pad).collect();
    match Kind::of(i) {
        Kind::Valid => serde_json::json!({"txn_id": format!("t{i}"), "card_id": key_of(i),
            "amount": 10.0 + (i % 97) as f64, "note": note})
        .to_string()
        .into_bytes(),
        Kind::NotJson => format!("not json {i}").into_bytes(),
        Kind::NotUtf8 => {
            let mut v = format!("{{\"txn_id\":\"t{i}\",\"x\":\"").into_bytes();
            v.extend_from_slice(&[0xff, 0xfe, b'"', b'}']);
            v
        }
        Kind::MissingField => format!(r#"{{"txn_id":"t{i}","amount":3}}"#).into_bytes(),
        Kind::WrongType => format!(r#"{{"txn_id":"t{i}","card_id":"c","amount":"lots"}}"#).into_bytes(),
        Kind::Oversized => format!(r#"{{"txn_id":"t{i}","card_id":"c","amount":1,"pad":"{}"}}"#, "x".repeat(2100)).into_bytes(),
    }
}

/// Where the broker put input `i` (from the producer's delivery report).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    pub partition: i32,
    pub offset: i64,
}

/// Produce inputs `from..to` to `in` with key, `traceparent` and [`TEST_ID`]
/// headers. Returns where each landed (acknowledged by the broker).
pub async fn produce_events(p: &FutureProducer, from: u64, to: u64, pad: usize) -> BTreeMap<u64, Placed> {
    let sends = (from..to).map(|i| async move {
        let key = key_of(i);
        let payload = payload_of(i, pad);
        let id = i.to_string();
        let tp = format!("00-{i:032x}-{i:016x}-01");
        let headers = OwnedHeaders::new()
            .insert(Header { key: TEST_ID, value: Some(&id) })
            .insert(Header { key: "traceparent", value: Some(&tp) });
        let r = FutureRecord::to("in").key(&key).payload(&payload).headers(headers);
        let d = p.send(r, Timeout::After(Duration::from_secs(20))).await.map_err(|(e, _)| e).expect("produce input");
        (i, Placed { partition: d.partition, offset: d.offset })
    });
    futures::future::join_all(sends).await.into_iter().collect()
}

/// One record read back from an output topic.
#[derive(Debug, Clone)]
pub struct Rec {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub headers: BTreeMap<String, String>,
    pub payload: Vec<u8>,
}

impl Rec {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or("")
    }

    /// The input this record answers ([`TEST_ID`] passed through).
    pub fn input(&self) -> Option<u64> {
        self.headers.get(TEST_ID)?.parse().ok()
    }
}

fn reader(b: &Broker) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", b.brokers())
        .set("group.id", "kairos-test-reader")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_uncommitted")
        .set("enable.partition.eof", "false")
        .create()
        .expect("reader")
}

/// High watermarks of every partition of `topic`.
pub fn end_offsets(b: &Broker, topic: &str) -> BTreeMap<i32, i64> {
    let c = reader(b);
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(10)).expect("metadata");
    let parts: Vec<i32> = md.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
    parts
        .into_iter()
        .map(|p| (p, c.fetch_watermarks(topic, p, Duration::from_secs(10)).expect("watermarks").1))
        .collect()
}

/// Records in `topic` (all partitions) right now.
pub fn count(b: &Broker, topic: &str) -> i64 {
    end_offsets(b, topic).values().sum()
}

/// Everything in `topic` up to its current high watermarks.
pub fn snapshot(b: &Broker, topic: &str) -> Vec<Rec> {
    let ends = end_offsets(b, topic);
    let c = reader(b);
    let mut tpl = TopicPartitionList::new();
    for &p in ends.keys() {
        tpl.add_partition_offset(topic, p, Offset::Beginning).expect("tpl");
    }
    c.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let mut next: BTreeMap<i32, i64> = ends.keys().map(|&p| (p, 0)).collect();
    let until = Instant::now() + Duration::from_secs(20);
    while ends.iter().any(|(p, e)| next[p] < *e) {
        assert!(Instant::now() < until, "could not read {topic} up to {ends:?} (at {next:?})");
        let Some(Ok(m)) = c.poll(Duration::from_millis(100)) else { continue };
        next.insert(m.partition(), m.offset() + 1);
        let headers = m
            .headers()
            .map(|h| {
                h.iter().map(|h| (h.key.to_string(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned())).collect()
            })
            .unwrap_or_default();
        out.push(Rec {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            headers,
            payload: m.payload().unwrap_or_default().to_vec(),
        });
    }
    out
}

/// How many output records (verdict + DLQ) each input has.
pub fn answers(verdicts: &[Rec], dlq: &[Rec]) -> BTreeMap<u64, usize> {
    let mut m = BTreeMap::new();
    for r in verdicts.iter().chain(dlq) {
        if let Some(i) = r.input() {
            *m.entry(i).or_insert(0) += 1;
        }
    }
    m
}

/// Snapshot both output topics every 300 ms until every input in `ids` is
/// answered or `timeout` passes; returns the last snapshot.
pub async fn wait_answered(b: &Broker, ids: &BTreeSet<u64>, timeout: Duration) -> (Vec<Rec>, Vec<Rec>) {
    let until = Instant::now() + timeout;
    loop {
        let (v, d) = (snapshot(b, "out"), snapshot(b, "dlq"));
        let a = answers(&v, &d);
        if ids.iter().all(|i| a.contains_key(i)) || Instant::now() >= until {
            return (v, d);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Committed offsets of `group` for each partition of `in`.
pub fn committed_all(b: &Broker, group: &str, partitions: i32) -> BTreeMap<i32, Option<i64>> {
    (0..partitions).map(|p| (p, committed(b, group, "in", p))).collect()
}

/// `kairos run` as a child process; stderr goes to a log file.
pub struct Kairos {
    child: Child,
    pub log: PathBuf,
    status: Option<ExitStatus>,
}

impl Kairos {
    pub fn start(config: &Path, log: &Path, args: &[&str]) -> Kairos {
        let err = std::fs::File::create(log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_kairos"))
            .args(["run", "--config"])
            .arg(config)
            .args(args)
            .env("KAIROS_LOG", "warn,kairos_connectors=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("start kairos");
        Kairos { child, log: log.to_path_buf(), status: None }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Verdicts so far, from the last live summary line (printed every second).
    pub fn verdicts(&self) -> u64 {
        let log = self.stderr();
        let last = log.lines().rev().find_map(|l| l.split("| verdicts ").nth(1).map(str::to_owned));
        last.and_then(|s| s.split_whitespace().next().and_then(|n| n.parse().ok())).unwrap_or(0)
    }

    /// Resident memory (kB) from /proc/<pid>/status, while it runs.
    pub fn rss_kb(&self) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// SIGKILL: no drain, no commit, no leave-group.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        self.status = self.child.wait().ok();
    }

    /// SIGTERM, then wait up to `timeout` for the drain and exit.
    pub fn term(&mut self, timeout: Duration) -> ExitStatus {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        self.wait(timeout).unwrap_or_else(|| panic!("kairos did not exit {timeout:?} after SIGTERM; log:\n{}", self.stderr()))
    }

    /// Wait for the process to exit on its own.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.status = Some(st);
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Kairos {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Check one verdict record against its input: key, headers and a payload
/// that is the schema's JSON object, decision first.
pub fn check_verdict(r: &Rec, placed: &Placed) {
    let i = r.input().expect("test id");
    assert_eq!(r.key.as_deref(), Some(key_of(i).as_str()), "key of {r:?}");
    assert_eq!(r.header("kairos-source"), format!("in/{}/{}", placed.partition, placed.offset), "{r:?}");
    assert_eq!(r.header("kairos-model"), "llama", "{r:?}");
    assert!(r.header("kairos-latency-us").parse::<u64>().is_ok(), "{r:?}");
    assert!(["true", "false"].contains(&r.header("kairos-deadline-met")), "{r:?}");
    assert!(["true", "false"].contains(&r.header("kairos-fallback")), "{r:?}");
    assert_eq!(r.header("traceparent"), format!("00-{i:032x}-{i:016x}-01"), "traceparent passed through: {r:?}");
    let text = std::str::from_utf8(&r.payload).expect("UTF-8 verdict");
    assert!(text.starts_with("{\"decision\":\""), "decision first: {text}");
    let v: serde_json::Value = serde_json::from_str(text).expect("verdict JSON");
    let o = v.as_object().expect("object");
    assert_eq!(o.len(), 3, "{text}");
    assert!(["allow", "review", "block"].contains(&o["decision"].as_str().unwrap_or("")), "{text}");
    assert!(o["score"].as_f64().is_some_and(|s| (0.0..=1.0).contains(&s)), "{text}");
    assert!(o["reason"].as_str().is_some_and(|s| s.chars().count() <= 40), "{text}");
}

/// Check one DLQ record against its input: original key, payload, a reason of the right kind.
pub fn check_dlq(r: &Rec, placed: &Placed) {
    let i = r.input().expect("test id");
    assert_eq!(r.key.as_deref(), Some(key_of(i).as_str()), "{r:?}");
    assert_eq!(r.payload, payload_of(i, 0), "the DLQ keeps the original payload: {r:?}");
    let want = Kind::of(i).reason();
    assert!(!want.is_empty(), "valid input {i} sent to the DLQ: {r:?}");
    assert!(r.header("kairos-dlq-reason").contains(want), "reason for {i}: want {want:?}, got {r:?}");
    assert_eq!(r.header("kairos-source"), format!("in/{}/{}", placed.partition, placed.offset), "{r:?}");
}

/// Duplicates: records beyond the first per input.
pub fn duplicates(a: &BTreeMap<u64, usize>) -> usize {
    a.values().map(|&n| n.saturating_sub(1)).sum()
}

pub fn missing(a: &BTreeMap<u64, usize>, ids: impl IntoIterator<Item = u64>) -> Vec<u64> {
    ids.into_iter().filter(|i| !a.contains_key(i)).collect()
}

/// Produce inputs `0..n` at `rate` events/s (in 10 ms ticks), calling
/// `each_tick` between ticks (to sample the process under load).
pub async fn produce_paced(p: &FutureProducer, n: u64, rate: f64, pad: usize, mut each_tick: impl FnMut()) -> BTreeMap<u64, Placed> {
    let per_tick = (rate / 100.0).max(1.0);
    let start = Instant::now();
    let mut sends = Vec::new();
    let mut next = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while next < n {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * 100.0 + 1.0) * per_tick) as u64;
        let upto = due.min(n);
        if upto > next {
            let p = p.clone();
            let (from, to) = (next, upto);
            sends.push(tokio::spawn(async move { produce_events(&p, from, to, pad).await }));
            next = upto;
        }
        each_tick();
    }
    let mut placed = BTreeMap::new();
    for s in sends {
        placed.extend(s.await.expect("producer task"));
    }
    placed
}

/// A list for an assertion message: the count and the first 20.
pub fn brief<T: std::fmt::Debug>(v: &[T]) -> String {
    format!("{} {:?}{}", v.len(), &v[..v.len().min(20)], if v.len() > 20 { " …" } else { "" })
}
