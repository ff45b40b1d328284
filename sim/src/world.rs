//! The driver: the shape of a run and its schedule of steps, all chosen by one seeded generator,
//! the delivery of messages at their time, and the checks.

use std::collections::{BTreeMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use driftsync_engine::chat::Author;
use driftsync_engine::doc::{text_delete, text_insert, text_len, MAX_CLIENT_ID};
use driftsync_engine::store::CompactionPolicy;
use driftsync_protocol::yjs::YMessage;
use driftsync_protocol::{ClientFrame, ServerFrame, DEFAULT_MAX_FRAME_SIZE};
use driftsync_server::Config;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::check::{contains, fingerprint, store_doc, Fingerprint};
use crate::client::{Ended, NativeClient, Outcome as NativeOutcome, Replica};
use crate::fanout::{Faults, LossyFanout, MAX_HOLD};
use crate::net::{Latency, Link};
use crate::server::Instance;
use crate::store::MemStore;
use crate::yjs::YjsReplica;
use crate::{Failure, Options, Report};

/// Chat stamps start here (2023-11-14): behind any real clock, so a server's skew bound, which
/// reads the real clock, never refuses a simulated stamp.
const BASE_WALL_MS: u64 = 1_700_000_000_000;
/// How long presence may be shown after its last refresh: the TTL and the server's sweep.
const PRESENCE_BOUND_MS: u64 = 30_000 + 5_000;
/// How long the healed system may take to sync everybody.
const QUIESCE_DEADLINE: Duration = Duration::from_secs(600);
/// How long every client may be synced by the protocol while a replica still differs from the
/// store: nothing but heartbeats happens then (presence aside), so the run has failed. (A room
/// stores what it failed to commit at its next sweep, and catches up on what the fan-out lost
/// at its next head check; this covers many of both.)
const QUIET_DEADLINE: Duration = Duration::from_secs(60);
/// How long after healing the run ticks finely (50 ms) at most; then once a second.
const HEAL_FINE: Duration = Duration::from_secs(60);
/// How often every instance compares its live rooms' heads with the store
/// (`Config::head_check`): what repairs a lost last fan-out message.
const HEAD_CHECK: Duration = Duration::from_secs(1);
/// Trace lines kept for a failure report.
const TRACE_TAIL: usize = 60;

/// What kind of client, with its replica.
#[derive(Debug)]
enum Kind {
    Native(Box<NativeClient>),
    Yjs(Box<YjsReplica>),
}

/// One simulated client.
#[derive(Debug)]
struct Client {
    kind: Kind,
    link: Option<Link>,
    /// The instance the link goes to.
    instance: usize,
    /// Offline on purpose until this virtual ms.
    offline_until: u64,
    /// Next connection attempt not before this virtual ms.
    retry_at: u64,
    latency: Latency,
    /// Its wall clock's offset from the virtual clock, ms.
    skew_ms: i64,
    /// A presence state is set.
    presence: bool,
    /// Stopped refreshing its presence (a frozen tab), still connected.
    quiet: bool,
}

/// The trace: every line hashed into the digest, the last ones kept.
#[derive(Debug)]
struct Trace {
    hasher: DefaultHasher,
    tail: VecDeque<String>,
    verbose: bool,
    lines: u64,
}

impl Trace {
    fn add(&mut self, now_ms: u64, line: String) {
        let line = format!("{:>10.3}s {line}", now_ms as f64 / 1000.0);
        line.hash(&mut self.hasher);
        self.lines += 1;
        if self.verbose {
            println!("{line}");
        }
        if self.tail.len() == TRACE_TAIL {
            self.tail.pop_front();
        }
        self.tail.push_back(line);
    }

    /// The digest of everything traced.
    fn digest(&self) -> u64 {
        self.hasher.finish()
    }
}

/// Everything a run holds.
pub(crate) struct World {
    seed: u64,
    rng: StdRng,
    start: Instant,
    store: Arc<MemStore>,
    config: Config,
    /// The fan-out between the instances (the one in `config`).
    fanout: LossyFanout,
    /// Its fault rates until healing.
    fanout_faults: Faults,
    instances: Vec<Option<Instance>>,
    /// Restart crashed instances at these virtual ms.
    restarts: BTreeMap<usize, u64>,
    commit_failures_until: u64,
    docs: Vec<String>,
    clients: Vec<Client>,
    /// (doc, presence peer) → the virtual ms its owner last sent a state.
    presence_sent: BTreeMap<(String, u64), u64>,
    /// The largest delay any link ever had, ms.
    max_latency_ms: u64,
    trace: Trace,
    links_opened: u64,
    /// Fan-out ids handed out so far (every start gets a new one).
    instance_ids: u64,
    next_check_ms: u64,
    stats: BTreeMap<&'static str, u64>,
}

impl World {
    /// A world whose shape comes from `seed`.
    pub(crate) fn new(seed: u64, options: Options) -> World {
        let start = Instant::now();
        let mut rng = StdRng::seed_from_u64(seed);
        let store = Arc::new(MemStore::new(rng.random()));
        let fanout_faults = Faults {
            drop: rng.random_range(0.0..0.2),
            duplicate: rng.random_range(0.0..0.1),
            reorder: rng.random_range(0.0..0.1),
        };
        let fanout = LossyFanout::new(rng.random(), fanout_faults, start);
        let config = Config {
            fanout: Arc::new(fanout.clone()),
            head_check: Some(HEAD_CHECK),
            compaction: CompactionPolicy {
                min_log_bytes: rng.random_range(512..8192),
                retain_entries: rng.random_range(0..16),
            },
            ..Config::default()
        };
        // Half the seeds run three instances (the lossy fan-out's case), the others one or two.
        let n_instances = if rng.random_bool(0.5) {
            3
        } else {
            rng.random_range(1..=2)
        };
        let mut docs = vec!["chat/room".to_string()];
        for i in 0..rng.random_range(1..=2) {
            docs.push(format!("notes/{i}"));
        }
        let n_clients = rng.random_range(2..=6);
        let mut clients = Vec::new();
        for i in 0..n_clients {
            let client_id = rng.random_range(1..MAX_CLIENT_ID);
            let latency = Latency {
                base: Duration::from_millis(rng.random_range(1..60)),
                jitter: Duration::from_millis(rng.random_range(0..200)),
            };
            let kind = if i < 2 || rng.random_bool(0.6) {
                let mut subscribed: Vec<String> = docs.iter().filter(|_| rng.random_bool(0.7)).cloned().collect();
                if subscribed.is_empty() {
                    subscribed.push(docs[0].clone());
                }
                let author = Author {
                    user: format!("user{}", i % 3),
                    device: format!("device{i}"),
                };
                Kind::Native(Box::new(NativeClient::new(client_id, author, &subscribed)))
            } else {
                let doc = docs[rng.random_range(1..docs.len())].clone();
                Kind::Yjs(Box::new(YjsReplica::new(&doc, client_id)))
            };
            clients.push(Client {
                kind,
                link: None,
                instance: 0,
                offline_until: 0,
                retry_at: rng.random_range(0..500),
                latency,
                skew_ms: rng.random_range(-120_000..120_000),
                presence: false,
                quiet: false,
            });
        }
        let max_latency_ms = clients
            .iter()
            .map(|c| u64::try_from(c.latency.max().as_millis()).unwrap_or(u64::MAX))
            .max()
            .unwrap_or(0);
        World {
            seed,
            rng,
            start,
            store,
            config,
            fanout,
            fanout_faults,
            instances: (0..n_instances).map(|_| None).collect(),
            restarts: BTreeMap::new(),
            commit_failures_until: 0,
            docs,
            clients,
            presence_sent: BTreeMap::new(),
            max_latency_ms,
            trace: Trace {
                hasher: DefaultHasher::new(),
                tail: VecDeque::new(),
                verbose: options.verbose,
                lines: 0,
            },
            links_opened: 0,
            instance_ids: 0,
            next_check_ms: 1000,
            stats: BTreeMap::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn log(&mut self, line: String) {
        let now = self.now_ms();
        self.trace.add(now, line);
    }

    fn count(&mut self, what: &'static str) {
        *self.stats.entry(what).or_default() += 1;
    }

    fn fail(&self, violation: String) -> Failure {
        Failure {
            seed: self.seed,
            violation,
            trace_tail: self.trace.tail.iter().cloned().collect(),
        }
    }

    /// The whole run: shape, schedule, healing, checks.
    pub(crate) async fn run(mut self) -> Result<Report, Failure> {
        let shape = format!(
            "{} instance(s), fan-out {}, docs {:?}, clients [{}], compaction {:?}",
            self.instances.len(),
            self.fanout_faults,
            self.docs,
            self.clients
                .iter()
                .map(|c| match &c.kind {
                    Kind::Native(r) => format!("native {} {:?}", r.client_id, r.docs().keys().collect::<Vec<_>>()),
                    Kind::Yjs(r) => format!("yjs {} {}", r.client_id, r.doc_id),
                })
                .collect::<Vec<_>>()
                .join(", "),
            self.config.compaction,
        );
        self.log(format!("seed {}: {shape}", self.seed));
        for i in 0..self.instances.len() {
            self.start_instance(i);
        }
        let steps = self.rng.random_range(100..400);
        for _ in 0..steps {
            self.step().await?;
        }
        self.heal().await?;
        self.check_final()?;
        let (failed, commits) = self.store.counts();
        let summary = format!(
            "{shape}; {steps} steps, {:.0} s virtual, {} links, {commits} commits ({failed} failed on purpose), {:?}, {:?}",
            self.now_ms() as f64 / 1000.0,
            self.links_opened,
            self.stats,
            self.fanout.stats(),
        );
        Ok(Report {
            seed: self.seed,
            digest: self.trace.digest(),
            summary,
        })
    }

    fn start_instance(&mut self, i: usize) {
        self.instance_ids += 1;
        let id = self.instance_ids;
        self.instances[i] = Some(Instance::start(Arc::clone(&self.store), self.config.clone(), id));
        self.log(format!("instance {i} starts (fan-out id {id})"));
    }

    /// One step of the schedule.
    async fn step(&mut self) -> Result<(), Failure> {
        let n = self.clients.len();
        match self.rng.random_range(0..100) {
            0..=39 => {
                let c = self.rng.random_range(0..n);
                self.write(c)?;
            }
            40..=64 => {
                let ms = self.rng.random_range(1..3000);
                self.advance(Duration::from_millis(ms), Duration::from_millis(20))
                    .await?;
            }
            65..=69 => {
                let c = self.rng.random_range(0..n);
                let abandon = self.rng.random_bool(0.3);
                let backoff = self.rng.random_range(100..5000);
                self.drop_link(c, abandon, backoff);
            }
            70..=71 => {
                // A long stretch offline, writing meanwhile (the writes come from other steps).
                let c = self.rng.random_range(0..n);
                let minutes = self.rng.random_range(1..180);
                self.drop_link(c, false, 0);
                let until = self.now_ms() + minutes * 60_000;
                self.clients[c].offline_until = until;
                self.log(format!("c{c} offline for {minutes} min"));
            }
            72 => {
                // Time passes in a long stretch (coarse ticks; heartbeats keep flowing).
                let minutes = self.rng.random_range(1..45);
                self.log(format!("{minutes} min pass"));
                self.advance(Duration::from_secs(minutes * 60), Duration::from_millis(1000))
                    .await?;
            }
            73..=77 => {
                let c = self.rng.random_range(0..n);
                self.duplicate(c);
            }
            78..=80 => {
                let c = self.rng.random_range(0..n);
                let slow = self.rng.random_bool(0.5);
                let latency = if slow {
                    Latency {
                        base: Duration::from_millis(self.rng.random_range(200..1500)),
                        jitter: Duration::from_millis(self.rng.random_range(0..1500)),
                    }
                } else {
                    Latency {
                        base: Duration::from_millis(self.rng.random_range(1..30)),
                        jitter: Duration::from_millis(self.rng.random_range(0..100)),
                    }
                };
                self.max_latency_ms = self
                    .max_latency_ms
                    .max(u64::try_from(latency.max().as_millis()).unwrap_or(u64::MAX));
                self.clients[c].latency = latency;
                if let Some(link) = self.clients[c].link.as_mut() {
                    link.set_latency(latency);
                }
                self.log(format!("c{c} latency {latency:?}"));
            }
            81..=82 => {
                let p = [0.3, 0.7, 1.0][self.rng.random_range(0..3)];
                let secs = self.rng.random_range(1..60);
                self.store.set_commit_failures(p);
                self.commit_failures_until = self.now_ms() + secs * 1000;
                self.log(format!("commits fail with p={p} for {secs} s"));
                self.count("commit-failure stretches");
            }
            83..=84 => {
                let up: Vec<usize> = (0..self.instances.len())
                    .filter(|&i| self.instances[i].is_some())
                    .collect();
                if !up.is_empty() {
                    let i = up[self.rng.random_range(0..up.len())];
                    if let Some(instance) = self.instances[i].take() {
                        instance.crash();
                    }
                    let after = self.rng.random_range(500..20_000);
                    self.restarts.insert(i, self.now_ms() + after);
                    self.log(format!("instance {i} crashes, restarts in {after} ms"));
                    self.count("crashes");
                }
            }
            85..=92 => {
                let c = self.rng.random_range(0..n);
                self.presence(c)?;
            }
            _ => {
                let ms = self.rng.random_range(1..300);
                self.advance(Duration::from_millis(ms), Duration::from_millis(10))
                    .await?;
            }
        }
        Ok(())
    }

    /// A random local change by client `c` (online or not).
    fn write(&mut self, c: usize) -> Result<(), Failure> {
        let now = self.now_ms();
        let wall = BASE_WALL_MS.saturating_add_signed(self.clients[c].skew_ms) + now;
        let pick: u32 = self.rng.random_range(0..100);
        let word_len = self.rng.random_range(1..8);
        let word: String = (0..word_len)
            .map(|_| char::from(b'a' + self.rng.random_range(0..26u8)))
            .collect();
        let pos_seed: u32 = self.rng.random();
        let len_seed: u32 = self.rng.random();
        let id_bits: u128 = self.rng.random();
        match &mut self.clients[c].kind {
            Kind::Native(replica) => {
                let docs: Vec<String> = replica.docs().keys().cloned().collect();
                let doc = docs[usize::try_from(pos_seed).unwrap_or(0) % docs.len()].clone();
                let author = replica.author.clone();
                let update = match replica.replica(&doc) {
                    Some(Replica::Chat(room)) => {
                        let messages = room.messages();
                        let own: Vec<_> = messages
                            .iter()
                            .filter(|m| m.author == author.user && !m.deleted)
                            .collect();
                        if pick < 60 || messages.is_empty() {
                            Some(room.send_with_id(&author, uuid_v7(wall, id_bits), &word, wall).1)
                        } else if pick < 70 && !own.is_empty() {
                            let m = own[len_seed as usize % own.len()];
                            room.edit(&author, &m.id, &word, wall).ok()
                        } else if pick < 75 && !own.is_empty() {
                            let m = own[len_seed as usize % own.len()];
                            room.delete(&author, &m.id, wall).ok()
                        } else {
                            let m = &messages[len_seed as usize % messages.len()];
                            room.mark_read(&author, &m.id, wall).ok().flatten()
                        }
                    }
                    Some(Replica::Text(doc)) => text_edit(doc, pick, &word, pos_seed, len_seed),
                    None => None,
                };
                let Some(update) = update else { return Ok(()) };
                let outcome = replica.write(&doc, update);
                let line = format!(
                    "c{c} writes {doc} (batch {})",
                    replica.outbox().last().map_or(0, |e| e.batch)
                );
                self.log(line);
                self.count("writes");
                self.native_outcome(c, outcome)?;
            }
            Kind::Yjs(replica) => {
                let Some(update) = text_edit(replica.doc(), pick, &word, pos_seed, len_seed) else {
                    return Ok(());
                };
                let messages = replica.write(update);
                let line = format!("c{c} writes {} (yjs)", replica.doc_id);
                self.log(line);
                self.count("writes");
                self.send_yjs(c, messages);
            }
        }
        Ok(())
    }

    fn duplicate(&mut self, c: usize) {
        let pick = self.rng.random_range(0..1000);
        match &self.clients[c].kind {
            Kind::Native(replica) => {
                if let Some(frame) = replica.resend(pick) {
                    self.log(format!("c{c} re-sends a push"));
                    self.count("re-sends");
                    self.send_native(c, vec![frame]);
                }
            }
            Kind::Yjs(replica) => {
                let messages = replica.resend();
                if !messages.is_empty() {
                    self.log(format!("c{c} re-sends its state"));
                    self.count("re-sends");
                    self.send_yjs(c, messages);
                }
            }
        }
    }

    fn presence(&mut self, c: usize) -> Result<(), Failure> {
        let now = self.now_ms();
        let roll = self.rng.random_range(0..10);
        let client = &mut self.clients[c];
        if roll == 0 && client.presence {
            client.quiet = !client.quiet;
            let line = format!(
                "c{c} presence refreshes {}",
                if client.quiet { "stop" } else { "resume" }
            );
            self.log(line);
            return Ok(());
        }
        let state = (roll < 7).then(|| format!("{{\"user\":\"c{c}\",\"at\":{now}}}"));
        client.presence = state.is_some();
        client.quiet = false;
        match &mut client.kind {
            Kind::Native(replica) => {
                let outcome = replica.set_presence(state.clone());
                self.log(format!("c{c} presence {state:?}"));
                self.native_outcome(c, outcome)?;
            }
            Kind::Yjs(replica) => {
                let messages = replica.set_awareness(state.clone(), now);
                self.yjs_presence_sent(c, &messages);
                self.log(format!("c{c} awareness {state:?}"));
                self.send_yjs(c, messages);
            }
        }
        Ok(())
    }

    /// Carries out what a native client wants: its frames sent (presence states noted), a
    /// violation reported, the connection closed and retried after the client's delay when the
    /// machine ended it (a resync almost at once, a failure after a backoff). Returns whether
    /// the connection was closed.
    fn native_outcome(&mut self, c: usize, outcome: NativeOutcome) -> Result<bool, Failure> {
        if let Some(violation) = outcome.violation {
            return Err(self.fail(violation));
        }
        self.native_presence_sent(c, &outcome.send);
        self.send_native(c, outcome.send);
        let Some(end) = outcome.end else { return Ok(false) };
        let backoff = match &end {
            Ended::Resync => self.rng.random_range(0..=250),
            Ended::Failed(_) => self.rng.random_range(200..3000),
        };
        self.log(format!(
            "c{c} client ends its connection ({end:?}), retries in {backoff} ms"
        ));
        let now = self.now_ms();
        let client = &mut self.clients[c];
        client.retry_at = now + backoff;
        // A clean close: what was sent still arrives; nothing more is read.
        if let Some(link) = client.link.take() {
            link.abandon();
        }
        if let Kind::Native(r) = &mut client.kind {
            r.disconnect();
        }
        Ok(true)
    }

    /// Records the presence states a native client is about to send.
    fn native_presence_sent(&mut self, c: usize, frames: &[ClientFrame]) {
        let now = self.now_ms();
        let Kind::Native(replica) = &self.clients[c].kind else {
            return;
        };
        let session = replica.session_id();
        for frame in frames {
            if let ClientFrame::Presence { doc, state: Some(_) } = frame {
                self.presence_sent.insert((doc.as_str().to_string(), session), now);
            }
        }
    }

    /// Records the awareness states a Yjs client is about to send.
    fn yjs_presence_sent(&mut self, c: usize, messages: &[YMessage]) {
        let now = self.now_ms();
        let Kind::Yjs(replica) = &self.clients[c].kind else {
            return;
        };
        let doc = replica.doc_id.clone();
        for message in messages {
            if let YMessage::Awareness(entries) = message {
                for entry in entries.iter().filter(|e| e.state.is_some()) {
                    self.presence_sent.insert((doc.clone(), entry.client_id), now);
                }
            }
        }
    }

    fn send_native(&mut self, c: usize, frames: Vec<ClientFrame>) {
        if frames.is_empty() {
            return;
        }
        let Some(link) = self.clients[c].link.as_mut() else {
            return;
        };
        for frame in &frames {
            link.send(frame.encode());
        }
        for frame in frames {
            let line = format!("c{c} -> {}", describe_client(&frame));
            self.log(line);
        }
    }

    fn send_yjs(&mut self, c: usize, messages: Vec<YMessage>) {
        if messages.is_empty() {
            return;
        }
        let Some(link) = self.clients[c].link.as_mut() else {
            return;
        };
        for message in &messages {
            link.send(message.encode());
        }
        for message in messages {
            let line = format!("c{c} -> {}", describe_yjs(&message));
            self.log(line);
        }
    }

    /// Drops client `c`'s connection (cut, or abandoned: what it sent still arrives) and retries
    /// after `backoff_ms`.
    fn drop_link(&mut self, c: usize, abandon: bool, backoff_ms: u64) {
        let now = self.now_ms();
        let client = &mut self.clients[c];
        client.retry_at = now + backoff_ms;
        let Some(link) = client.link.take() else { return };
        if abandon {
            link.abandon();
        } else {
            link.cut();
        }
        match &mut client.kind {
            Kind::Native(r) => r.disconnect(),
            Kind::Yjs(r) => r.disconnect(),
        }
        self.log(format!(
            "c{c} {} its connection",
            if abandon { "abandons" } else { "cuts" }
        ));
        self.count(if abandon { "abandoned links" } else { "cut links" });
    }

    /// Lets `total` of virtual time pass in ticks of `tick`, delivering messages and running
    /// the scheduled events.
    async fn advance(&mut self, total: Duration, tick: Duration) -> Result<(), Failure> {
        let end = Instant::now() + total;
        while Instant::now() < end {
            let next = (Instant::now() + tick).min(end);
            tokio::time::sleep_until(next).await;
            self.tick(false).await?;
        }
        Ok(())
    }

    /// One tick: scheduled events, connections, deliveries, presence upkeep and checks.
    async fn tick(&mut self, healing: bool) -> Result<(), Failure> {
        let now = self.now_ms();
        let due: Vec<usize> = self
            .restarts
            .iter()
            .filter(|&(_, &at)| at <= now || healing)
            .map(|(&i, _)| i)
            .collect();
        for i in due {
            self.restarts.remove(&i);
            self.start_instance(i);
        }
        if self.commit_failures_until != 0 && (now >= self.commit_failures_until || healing) {
            self.commit_failures_until = 0;
            self.store.set_commit_failures(0.0);
            self.log("commits succeed again".into());
        }
        self.fanout.release_due();
        self.trace_fanout();
        for c in 0..self.clients.len() {
            self.connect_if_due(c).await?;
            self.deliver(c)?;
            self.upkeep(c)?;
        }
        if now >= self.next_check_ms {
            self.next_check_ms = now + 1000;
            self.check_presence()?;
        }
        Ok(())
    }

    /// Traces what the fan-out did since the last tick, at the virtual times it did it.
    fn trace_fanout(&mut self) {
        for (ms, line) in self.fanout.take_log() {
            self.trace.add(ms, line);
        }
    }

    async fn connect_if_due(&mut self, c: usize) -> Result<(), Failure> {
        let now = self.now_ms();
        let client = &self.clients[c];
        if client.link.is_some() || now < client.offline_until || now < client.retry_at {
            return Ok(());
        }
        let up: Vec<usize> = (0..self.instances.len())
            .filter(|&i| self.instances[i].is_some())
            .collect();
        if up.is_empty() {
            self.clients[c].retry_at = now + 1000;
            return Ok(());
        }
        let i = up[self.rng.random_range(0..up.len())];
        let Some(instance) = self.instances[i].as_ref() else {
            return Ok(());
        };
        let stream = match &self.clients[c].kind {
            Kind::Native(_) => instance.connect_native(),
            Kind::Yjs(r) => instance.connect_yjs(&r.doc_id),
        };
        self.links_opened += 1;
        let link_seed = self.rng.random();
        let link = Link::open(stream, self.clients[c].latency, link_seed).await;
        let client = &mut self.clients[c];
        client.link = Some(link);
        client.instance = i;
        self.log(format!("c{c} connects to instance {i}"));
        match &mut self.clients[c].kind {
            Kind::Native(r) => {
                let outcome = r.connect("", Duration::from_millis(now));
                self.native_outcome(c, outcome)?;
            }
            Kind::Yjs(r) => {
                let messages = r.connect(now);
                self.yjs_presence_sent(c, &messages);
                self.send_yjs(c, messages);
            }
        }
        Ok(())
    }

    /// Hands client `c` what has arrived for it, and notices a closed connection.
    fn deliver(&mut self, c: usize) -> Result<(), Failure> {
        let now = self.now_ms();
        let Some(link) = self.clients[c].link.as_mut() else {
            return Ok(());
        };
        let messages = link.deliverable();
        let closed = link.is_closed();
        for message in messages {
            let Message::Binary(bytes) = message else {
                let (why, code) = match &message {
                    Message::Close(Some(frame)) => (
                        format!(" {} {:?}", u16::from(frame.code), frame.reason.as_str()),
                        Some(u16::from(frame.code)),
                    ),
                    _ => (String::new(), None),
                };
                self.log(format!("c{c} <- close{why}"));
                if let Kind::Native(replica) = &mut self.clients[c].kind {
                    let outcome = replica.closed(code);
                    if self.native_outcome(c, outcome)? {
                        return Ok(());
                    }
                }
                continue;
            };
            match &mut self.clients[c].kind {
                Kind::Native(replica) => {
                    let frame = match ServerFrame::decode(&bytes, DEFAULT_MAX_FRAME_SIZE) {
                        Ok(frame) => frame,
                        Err(e) => return Err(self.fail(format!("c{c} got an undecodable frame: {e}"))),
                    };
                    let mut line = format!("c{c} <- {}", describe_server(&frame));
                    if let ServerFrame::Error {
                        code: driftsync_protocol::ErrorCode::MissingDependencies,
                        doc: Some(doc),
                        batch: Some(batch),
                    } = &frame
                    {
                        if let Some(update) = replica.sent_update(doc.as_str(), *batch) {
                            line.push_str(&missing_detail(&self.store, doc.as_str(), &update));
                        }
                    }
                    let outcome = replica.receive(frame, Duration::from_millis(now));
                    self.log(line);
                    if self.native_outcome(c, outcome)? {
                        return Ok(());
                    }
                }
                Kind::Yjs(replica) => {
                    let message = match YMessage::decode(&bytes, DEFAULT_MAX_FRAME_SIZE) {
                        Ok(message) => message,
                        Err(e) => return Err(self.fail(format!("c{c} got an undecodable y-protocols message: {e}"))),
                    };
                    let line = format!("c{c} <- {}", describe_yjs(&message));
                    let answers = replica.receive(message, now);
                    self.log(line);
                    match answers {
                        Ok(answers) => self.send_yjs(c, answers),
                        Err(e) => return Err(self.fail(format!("c{c}: {e}"))),
                    }
                }
            }
        }
        if closed {
            self.log(format!("c{c} connection closed"));
            let backoff = self.rng.random_range(200..3000);
            if let Some(link) = self.clients[c].link.take() {
                link.cut();
            }
            self.clients[c].retry_at = now + backoff;
            match &mut self.clients[c].kind {
                Kind::Native(r) => r.disconnect(),
                Kind::Yjs(r) => r.disconnect(),
            }
        }
        Ok(())
    }

    /// Time passes for client `c`: a Yjs client renews its awareness; a native client's machine
    /// ticks (heartbeats, which renew its presence, silence, documents to resume again). A
    /// quiet client's renewals are dropped (a frozen tab).
    fn upkeep(&mut self, c: usize) -> Result<(), Failure> {
        let now = self.now_ms();
        let client = &mut self.clients[c];
        let renew = !client.quiet;
        match &mut client.kind {
            Kind::Yjs(replica) => {
                let messages = replica.tick(now, renew);
                self.yjs_presence_sent(c, &messages);
                self.send_yjs(c, messages);
            }
            Kind::Native(replica) => {
                if client.link.is_some() {
                    let outcome = replica.tick(Duration::from_millis(now), renew);
                    self.native_outcome(c, outcome)?;
                }
            }
        }
        Ok(())
    }

    /// No client shows a presence state longer than its bound after its owner last sent it.
    fn check_presence(&self) -> Result<(), Failure> {
        let now = self.now_ms();
        // The network's delays both ways, a tick, and how long the fan-out may hold a message
        // back (a late presence state is taken in at its arrival).
        let slack = 2 * self.max_latency_ms + 1000 + u64::try_from(MAX_HOLD.as_millis()).unwrap_or(u64::MAX);
        for (c, client) in self.clients.iter().enumerate() {
            let shown: Vec<(String, u64)> = match &client.kind {
                Kind::Native(r) => r.presence().keys().cloned().collect(),
                Kind::Yjs(r) => r.presence().keys().map(|&peer| (r.doc_id.clone(), peer)).collect(),
            };
            for key in shown {
                match self.presence_sent.get(&key) {
                    None => {
                        return Err(self.fail(format!(
                            "c{c} shows presence of peer {} in {} that no client ever sent",
                            key.1, key.0
                        )))
                    }
                    Some(&sent) if now > sent + PRESENCE_BOUND_MS + slack => {
                        return Err(self.fail(format!(
                            "c{c} still shows presence of peer {} in {} at {} ms, last refreshed at {sent} ms \
                             (bound: TTL 30 s + sweep 5 s + {slack} ms of network)",
                            key.1, key.0, now
                        )))
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(())
    }

    /// Heals every fault, brings everybody online, and waits until everybody is synced.
    async fn heal(&mut self) -> Result<(), Failure> {
        self.log("heal: no more faults".into());
        // The fan-out delivers every message from now on; what it holds back still arrives
        // late. A lost last update is repaired by the head check.
        self.fanout.set_faults(Faults::NONE);
        let now = self.now_ms();
        for client in &mut self.clients {
            client.offline_until = 0;
            client.retry_at = client.retry_at.min(now + 1000);
            client.latency = Latency {
                base: Duration::from_millis(5),
                jitter: Duration::from_millis(20),
            };
            if let Some(link) = client.link.as_mut() {
                link.set_latency(client.latency);
            }
        }
        self.tick(true).await?;
        let started = Instant::now();
        let deadline = started + QUIESCE_DEADLINE;
        // Since when every client has been synced by the protocol, with replicas that still
        // differ from the store (compared once a virtual second).
        let mut quiet_since: Option<Instant> = None;
        let mut compared_at = started;
        loop {
            // Fine ticks while things happen; coarse ones once nothing will but heartbeats (a
            // failing seed costs little), or after a long wait.
            let quiet = quiet_since.is_some() || Instant::now() >= started + HEAL_FINE;
            let tick = if quiet {
                Duration::from_millis(1000)
            } else {
                Duration::from_millis(50)
            };
            tokio::time::sleep(tick).await;
            self.tick(true).await?;
            if !self.protocol_unsettled().is_empty() {
                quiet_since = None;
            } else if Instant::now() >= compared_at + Duration::from_secs(1) || quiet_since.is_none() {
                compared_at = Instant::now();
                match self.compare_replicas() {
                    Ok(()) => {
                        self.log("everybody is synced".into());
                        return Ok(());
                    }
                    Err(difference) => {
                        let since = *quiet_since.get_or_insert_with(Instant::now);
                        if Instant::now() >= since + QUIET_DEADLINE {
                            return Err(self.fail(format!(
                                "synced but not converged {} s after healing (every client synced for {} s): {difference}",
                                (Instant::now() - started).as_secs(),
                                QUIET_DEADLINE.as_secs(),
                            )));
                        }
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(self.fail(format!(
                    "not synced {} s after healing: {}",
                    QUIESCE_DEADLINE.as_secs(),
                    self.unsettled_reason()
                )));
            }
        }
    }

    /// Why not everybody is synced by the protocol (empty: they are): a native client not
    /// synced by its machine or with an outbox, a Yjs client not connected and synced.
    fn protocol_unsettled(&self) -> String {
        for (c, client) in self.clients.iter().enumerate() {
            match &client.kind {
                Kind::Native(r) if !r.synced() => {
                    return format!(
                        "c{c} (native) not synced: online {}, outbox {:?}",
                        r.online(),
                        r.outbox().iter().map(|e| (&e.doc, e.batch)).collect::<Vec<_>>()
                    )
                }
                Kind::Yjs(r) if !(r.connected() && r.synced) => {
                    return format!("c{c} (yjs) not synced: connected {}", r.connected())
                }
                _ => {}
            }
        }
        String::new()
    }

    /// Why the run is not settled: the protocol's reason, or how a replica differs.
    fn unsettled_reason(&self) -> String {
        let reason = self.protocol_unsettled();
        if !reason.is_empty() {
            return reason;
        }
        match self.compare_replicas() {
            Ok(()) => String::new(),
            Err(e) => e,
        }
    }

    /// Every replica equals the store's document.
    fn compare_replicas(&self) -> Result<(), String> {
        let mut stored: BTreeMap<&str, Fingerprint> = BTreeMap::new();
        for doc in &self.docs {
            let d = store_doc(&self.store, doc)?;
            stored.insert(doc, fingerprint(&d, None, doc.starts_with("chat/")));
        }
        for (c, client) in self.clients.iter().enumerate() {
            let mine: Vec<(String, Fingerprint)> = match &client.kind {
                Kind::Native(r) => r
                    .docs()
                    .iter()
                    .map(|(id, replica)| {
                        let room = match replica {
                            Replica::Chat(room) => Some(room),
                            Replica::Text(_) => None,
                        };
                        (id.clone(), fingerprint(replica.doc(), room, false))
                    })
                    .collect(),
                Kind::Yjs(r) => vec![(r.doc_id.clone(), fingerprint(r.doc(), None, false))],
            };
            for (doc, fp) in mine {
                if let Some(diff) = stored.get(doc.as_str()).and_then(|s| fp.difference(s)) {
                    return Err(format!("c{c}'s replica of {doc} differs from the store: {diff}"));
                }
            }
        }
        Ok(())
    }

    /// The invariants after healing.
    fn check_final(&mut self) -> Result<(), Failure> {
        self.compare_replicas().map_err(|e| self.fail(e))?;
        // Every acknowledged batch is in the store.
        let mut docs: BTreeMap<String, yrs::Doc> = BTreeMap::new();
        for doc in &self.docs {
            docs.insert(doc.clone(), store_doc(&self.store, doc).map_err(|e| self.fail(e))?);
        }
        let mut acked = 0u64;
        for (c, client) in self.clients.iter().enumerate() {
            let Kind::Native(r) = &client.kind else { continue };
            for (doc, batch, update) in r.acked() {
                acked += 1;
                let Some(stored) = docs.get(doc) else { continue };
                match contains(stored, update) {
                    Ok(true) => {}
                    Ok(false) => {
                        return Err(self.fail(format!(
                            "c{c}'s batch {batch} of {doc} was acknowledged but the store lacks it"
                        )))
                    }
                    Err(e) => return Err(self.fail(format!("c{c}'s batch {batch} of {doc}: {e}"))),
                }
            }
        }
        self.stats.insert("acknowledged batches", acked);
        self.check_presence()
    }
}

/// A UUIDv7 (what `ChatRoom::send` makes) from a wall time in ms and random bits the seed
/// drew: message ids stay the same run after run.
fn uuid_v7(wall_ms: u64, bits: u128) -> String {
    let rand_a = (bits >> 64) as u16 & 0x0fff;
    let rand_b = (bits as u64) & 0x3fff_ffff_ffff_ffff;
    format!(
        "{:08x}-{:04x}-7{:03x}-{:04x}-{:012x}",
        (wall_ms >> 16) & 0xffff_ffff,
        wall_ms & 0xffff,
        rand_a,
        0x8000 | (rand_b >> 48),
        rand_b & 0xffff_ffff_ffff
    )
}

/// A random text edit of `doc`: mostly inserts, some deletions.
fn text_edit(doc: &yrs::Doc, pick: u32, word: &str, pos_seed: u32, len_seed: u32) -> Option<Vec<u8>> {
    let len = text_len(doc);
    if pick < 70 || len == 0 {
        text_insert(doc, pos_seed % (len + 1), word).ok()
    } else {
        let at = pos_seed % len;
        let del = 1 + len_seed % (len - at).min(6);
        text_delete(doc, at, del).ok()
    }
}

fn describe_client(frame: &ClientFrame) -> String {
    match frame {
        ClientFrame::Hello { client_id, .. } => format!("Hello {client_id}"),
        ClientFrame::Resume { docs } => format!(
            "Resume {:?}",
            docs.iter().map(|d| (d.doc.as_str(), d.cursor)).collect::<Vec<_>>()
        ),
        ClientFrame::Push { doc, batch, update } => format!("Push {doc} batch {batch} ({} B)", update.len()),
        ClientFrame::Presence { doc, state } => format!("Presence {doc} {}", state.is_some()),
        other => format!("{other:?}"),
    }
}

fn describe_server(frame: &ServerFrame) -> String {
    match frame {
        ServerFrame::Welcome { session, .. } => format!("Welcome session {session}"),
        ServerFrame::Resumed { docs } => format!(
            "Resumed {:?}",
            docs.iter()
                .map(|d| (
                    d.doc.as_str(),
                    d.cursor,
                    d.update.as_ref().map(Vec::len),
                    d.state_vector.is_some()
                ))
                .collect::<Vec<_>>()
        ),
        ServerFrame::Update { doc, cursor, update } => format!("Update {doc} cursor {cursor} ({} B)", update.len()),
        ServerFrame::ResumePart { doc, bytes } => format!("ResumePart {doc} ({} B)", bytes.len()),
        ServerFrame::Presence { doc, peer, state, .. } => format!("Presence {doc} peer {peer} {}", state.is_some()),
        other => format!("{other:?}"),
    }
}

fn describe_yjs(message: &YMessage) -> String {
    match message {
        YMessage::SyncStep1(sv) => format!("SyncStep1 ({} B)", sv.len()),
        YMessage::SyncStep2(u) => format!("SyncStep2 ({} B)", u.len()),
        YMessage::Update(u) => format!("Update ({} B)", u.len()),
        YMessage::Awareness(entries) => format!(
            "Awareness {:?}",
            entries
                .iter()
                .map(|e| (e.client_id, e.clock, e.state.is_some()))
                .collect::<Vec<_>>()
        ),
        other => format!("{other:?}"),
    }
}

/// Why the store's document cannot take `update` (for a `MissingDependencies` in the trace).
fn missing_detail(store: &MemStore, doc: &str, update: &[u8]) -> String {
    let Ok(stored) = store_doc(store, doc) else {
        return String::new();
    };
    let sv: Vec<(u64, u32)> = {
        use yrs::{ReadTxn as _, Transact as _};
        stored
            .transact()
            .state_vector()
            .iter()
            .map(|(c, k)| (c.get(), *k))
            .collect()
    };
    match driftsync_engine::validate::check_update(update) {
        Ok(summary) => format!(
            " [store sv {sv:?}; push carries {:?}, references {:?}, deletes {:?}]",
            summary.carried, summary.references, summary.deletes
        ),
        Err(e) => format!(" [push does not validate: {e}]"),
    }
}
