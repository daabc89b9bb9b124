//! Test helpers: a real Kafka-protocol broker (noida-db) per test, topic
//! admin, producing inputs, an echo "pipeline", reading outputs.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use kairos_connectors::kafka::{KafkaSinkConfig, KafkaSourceConfig};
use kairos_connectors::{Event, OutRecord, Sink, SourceHandle};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

fn noida_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let locate = || {
            Command::new("python3")
                .args(["-c", "import importlib.resources as r; print(r.files('noida_db') / 'noida-db')"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        };
        if let Some(p) = locate().filter(|p| p.exists()) {
            return p;
        }
        let st = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "noida-db==0.2.3"])
            .status()
            .expect("run python3 -m pip");
        assert!(st.success(), "pip install noida-db==0.2.3 failed");
        locate().filter(|p| p.exists()).expect("noida-db binary not found after install")
    })
    .clone()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A noida-db broker on its own port and data dir, killed (by PID) on drop.
pub struct Broker {
    child: Option<Child>,
    pub port: u16,
    pub data_dir: PathBuf,
}

impl Broker {
    pub fn start() -> Broker {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
            )
            .with_test_writer()
            .try_init();
        let port = free_port();
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let data_dir = std::env::temp_dir().join(format!("kairos-noida-{}-{port}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&data_dir).expect("data dir");
        let mut b = Broker { child: None, port, data_dir };
        b.spawn();
        b
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.join("broker.log"))
            .expect("log file");
        let log2 = log.try_clone().expect("log clone");
        let child = Command::new(noida_bin())
            .args(["start", "--only", "kafka", "--host", "127.0.0.1", "--kafka-port"])
            .arg(self.port.to_string())
            .arg("--data-dir")
            .arg(self.data_dir.join("data"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .expect("start noida-db");
        self.child = Some(child);
        let until = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("noida-db exited with {st}; log:\n{}", self.log());
            }
            assert!(Instant::now() < until, "noida-db did not listen on {} in 15 s; log:\n{}", self.port, self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("broker.log")).unwrap_or_default()
    }

    /// Stop the broker process (SIGINT by PID, as Ctrl-C; SIGKILL after 5 s) and wait for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").args(["-INT", &c.id().to_string()]).status();
            let until = Instant::now() + Duration::from_secs(5);
            while Instant::now() < until {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again on the same port and data dir.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

pub fn test_librdkafka() -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert("reconnect.backoff.max.ms".into(), "500".into());
    m.insert("topic.metadata.refresh.interval.ms".into(), "1000".into());
    m.insert("fetch.wait.max.ms".into(), "100".into());
    m
}

pub fn source_config(b: &Broker, topic: &str, group: &str) -> KafkaSourceConfig {
    let json = serde_json::json!({
        "brokers": b.brokers(),
        "topics": [topic],
        "group_id": group,
        "session_timeout_ms": 6000,
        "heartbeat_interval_ms": 500,
        "auto_commit_interval_ms": 200,
        "shutdown_drain_ms": 3000,
        "librdkafka": test_librdkafka(),
    });
    serde_json::from_value(json).expect("source config")
}

pub fn sink_config(b: &Broker, out: &str, dlq: Option<&str>) -> KafkaSinkConfig {
    let json = serde_json::json!({
        "brokers": b.brokers(),
        "output_topic": out,
        "dlq_topic": dlq,
        "message_timeout_ms": 10000,
        "librdkafka": test_librdkafka(),
    });
    serde_json::from_value(json).expect("sink config")
}

pub async fn create_topic(b: &Broker, name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", b.brokers()).create().expect("admin client");
    let t = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let r = tokio::time::timeout(Duration::from_secs(10), admin.create_topics([&t], &AdminOptions::new()))
        .await
        .expect("create_topics timed out")
        .expect("create_topics");
    for x in r {
        x.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
    }
}

pub fn producer(b: &Broker) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", b.brokers())
        .set("enable.idempotence", "true")
        .set("linger.ms", "1")
        .set("message.timeout.ms", "20000")
        .set("reconnect.backoff.max.ms", "500")
        .create()
        .expect("producer")
}

/// Produce inputs `from..to` with key `k<i % keys>`, JSON payload `{"i":i}`,
/// and `traceparent` / `kairos-deadline-ms` headers.
pub async fn produce_inputs(p: &FutureProducer, topic: &str, from: u64, to: u64) {
    let sends = (from..to).map(|i| {
        let key = format!("k{}", i % 17);
        let payload = format!("{{\"i\":{i}}}");
        let headers = OwnedHeaders::new()
            .insert(Header { key: "traceparent", value: Some(&format!("00-{i:032x}-{i:016x}-01")) })
            .insert(Header { key: "kairos-deadline-ms", value: Some("1700000000000") });
        async move {
            let r = FutureRecord::to(topic).key(&key).payload(&payload).headers(headers);
            p.send(r, Timeout::After(Duration::from_secs(20))).await.map_err(|(e, _)| e).expect("produce input");
        }
    });
    futures::future::join_all(sends).await;
}

/// The echo verdict for an event: `{"decision":"allow","input":<payload>}`,
/// key and headers passed through, plus `kairos-source`.
pub fn echo(ev: &Event) -> OutRecord {
    let input: serde_json::Value = serde_json::from_slice(&ev.payload).unwrap_or(serde_json::Value::Null);
    let mut r = OutRecord::output_for(ev, serde_json::json!({"decision": "allow", "input": input}).to_string().into_bytes());
    r.set_header("kairos-source", ev.origin.to_string());
    r
}

/// Run an echo pipeline over a source until its channel closes: every event
/// is answered through `sink`, then acked. `delay` slows each event down.
pub fn spawn_echo(h: SourceHandle, sink: Arc<dyn Sink>, delay: Duration) -> tokio::task::JoinHandle<(u64, SourceHandle)> {
    spawn_echo_logged(h, sink, delay, Arc::default())
}

/// [`spawn_echo`] that also records the input `i` of every acknowledged send.
pub fn spawn_echo_logged(
    mut h: SourceHandle,
    sink: Arc<dyn Sink>,
    delay: Duration,
    sent: Arc<std::sync::Mutex<std::collections::BTreeSet<u64>>>,
) -> tokio::task::JoinHandle<(u64, SourceHandle)> {
    tokio::spawn(async move {
        let mut n = 0;
        while let Some(ev) = h.events.recv().await {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            sink.send(echo(&ev)).await.expect("sink send");
            if let Some(i) = serde_json::from_slice::<serde_json::Value>(&ev.payload).ok().and_then(|v| v["i"].as_u64()) {
                sent.lock().unwrap_or_else(|e| e.into_inner()).insert(i);
            }
            h.acker.ack(&ev.origin);
            n += 1;
        }
        (n, h)
    })
}

/// One output record as read back.
#[derive(Debug, Clone)]
pub struct Out {
    pub key: Option<String>,
    pub headers: BTreeMap<String, String>,
    pub payload: serde_json::Value,
}

/// Read `topic` from the beginning (read_committed) until `want` records
/// arrived (then `linger` longer, to catch extras) or `timeout` passes.
pub async fn read_outputs(b: &Broker, topic: &str, want: usize, timeout: Duration, linger: Duration) -> Vec<Out> {
    read_outputs_iso(b, topic, want, timeout, linger, "read_committed").await
}

/// Read `topic` until inputs `0..n` are all answered (then `linger`), or `timeout`.
pub async fn read_until_answered(b: &Broker, topic: &str, n: u64, timeout: Duration, linger: Duration) -> Vec<Out> {
    read_outputs_until(b, topic, timeout, linger, "read_committed", move |outs| answered(outs).len() as u64 >= n).await
}

pub async fn read_outputs_iso(b: &Broker, topic: &str, want: usize, timeout: Duration, linger: Duration, iso: &'static str) -> Vec<Out> {
    read_outputs_until(b, topic, timeout, linger, iso, move |outs| outs.len() >= want).await
}

pub async fn read_outputs_until(
    b: &Broker,
    topic: &str,
    timeout: Duration,
    linger: Duration,
    iso: &'static str,
    done: impl Fn(&[Out]) -> bool + Send + 'static,
) -> Vec<Out> {
    let brokers = b.brokers();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", format!("reader-{}", free_port()))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .set("isolation.level", iso)
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500")
            .create()
            .expect("reader");
        c.subscribe(&[&topic]).expect("subscribe");
        let mut out = Vec::new();
        let until = Instant::now() + timeout;
        let mut linger_until: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if now >= until || linger_until.is_some_and(|l| now >= l) {
                break;
            }
            if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key.to_string(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()))
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(Out {
                    key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    headers,
                    payload: serde_json::from_slice(m.payload().unwrap_or_default()).unwrap_or(serde_json::Value::Null),
                });
                if linger_until.is_none() && done(&out) {
                    linger_until = Some(Instant::now() + linger);
                }
            }
        }
        out
    })
    .await
    .expect("reader task")
}

/// The input index `i` each output answers.
pub fn answered(outs: &[Out]) -> std::collections::BTreeSet<u64> {
    outs.iter().filter_map(|o| o.payload["input"]["i"].as_u64()).collect()
}

/// Committed offset of `group` on `topic`/`partition` (None when none).
pub fn committed(b: &Broker, group: &str, topic: &str, partition: i32) -> Option<i64> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", b.brokers())
        .set("group.id", group)
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    let r = c.committed_offsets(tpl, Duration::from_secs(10)).expect("committed offsets");
    match r.find_partition(topic, partition)?.offset() {
        Offset::Offset(o) => Some(o),
        _ => None,
    }
}

/// Poll `cond` every 50 ms until it holds or `timeout` passes.
pub async fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < until, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
