//! The report: markdown tables of every workload (each system from the same results file, with
//! ratios to the best anchor, and for fan-out to the bare relay, the floor; cross-instance fan-out
//! against one instance and @y/hub's published figures) and the fan-out chart (PNG, drawn with plotters; text uses a TTF
//! font found on the machine through ab_glyph, and is left out if none is found).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use serde_json::Value;

use crate::b4::ResyncResult;
use crate::clients::System;
use crate::cross::CrossResult;
use crate::load::{FanoutResult, IdleResult, ThroughputResult};
use crate::writers::WritersResult;

/// The systems in table order.
const ORDER: [System; 7] = [
    System::Native,
    System::DsYjs,
    System::DsHocuspocus,
    System::YWebsocket,
    System::Hocuspocus,
    System::YSweet,
    System::Relay,
];

/// How a system is named in tables.
pub fn label(system: System) -> &'static str {
    match system {
        System::Native => "driftsync native",
        System::DsYjs => "driftsync /yjs",
        System::DsHocuspocus => "driftsync /hocuspocus",
        System::YWebsocket => "y-websocket server 0.1.1",
        System::Hocuspocus => "Hocuspocus 3.4.4",
        System::YSweet => "y-sweet 0.9.1",
        System::Relay => "bare relay (floor)",
    }
}

/// One line of a results file.
struct Line {
    workload: String,
    system: System,
    params: Value,
    result: Value,
}

fn read_lines(path: &Path) -> anyhow::Result<Vec<Line>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = Vec::new();
    for l in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(l)?;
        lines.push(Line {
            workload: v["workload"].as_str().unwrap_or_default().to_string(),
            system: serde_json::from_value(v["system"].clone())?,
            params: v["params"].clone(),
            result: v["result"].clone(),
        });
    }
    Ok(lines)
}

/// The best (lowest, or with `higher` the highest) value among the anchors.
fn best_anchor(values: &BTreeMap<usize, f64>, higher: bool) -> Option<f64> {
    let anchors = values
        .iter()
        .filter(|(i, _)| ORDER[**i].is_anchor())
        .map(|(_, v)| *v)
        .filter(|v| *v > 0.0);
    if higher {
        anchors.reduce(f64::max)
    } else {
        anchors.reduce(f64::min)
    }
}

fn ratio(value: f64, best: Option<f64>) -> String {
    match best {
        Some(b) if b > 0.0 => format!("{:.2}", value / b),
        _ => "—".into(),
    }
}

fn idx(system: System) -> usize {
    ORDER.iter().position(|s| *s == system).unwrap_or(0)
}

fn ms(us: f64) -> String {
    format!("{:.2}", us / 1000.0)
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The results of `workload`, with their systems (lines that do not parse are skipped).
fn results_of<T: serde::de::DeserializeOwned>(lines: &[Line], workload: &str) -> Vec<(System, T)> {
    lines
        .iter()
        .filter(|l| l.workload == workload)
        .filter_map(|l| Some((l.system, serde_json::from_value(l.result.clone()).ok()?)))
        .collect()
}

/// Writes the markdown report and the chart.
pub fn report(results: &Path, md: &Path, chart: &Path, chart_link: &str) -> anyhow::Result<()> {
    let lines = read_lines(results)?;
    let mut out = String::new();
    let fanout: Vec<(System, FanoutResult)> = results_of(&lines, "fanout");
    if !fanout.is_empty() {
        fanout_section(&mut out, &fanout, chart_link)?;
        if let Err(e) = draw_fanout(&fanout, chart) {
            eprintln!("chart not drawn: {e:#}");
        }
    }
    let idle: Vec<(System, IdleResult)> = results_of(&lines, "idle");
    if !idle.is_empty() {
        idle_section(&mut out, &idle)?;
    }
    let resync: Vec<(System, ResyncResult)> = results_of(&lines, "resync");
    if !resync.is_empty() {
        resync_section(&mut out, &resync)?;
    }
    let cold: Vec<&Line> = lines.iter().filter(|l| l.workload == "cold").collect();
    if !cold.is_empty() {
        cold_section(&mut out, &cold)?;
    }
    let tp: Vec<(System, ThroughputResult)> = results_of(&lines, "throughput");
    if !tp.is_empty() {
        throughput_section(&mut out, &tp)?;
    }
    let writers: Vec<(System, WritersResult)> = results_of(&lines, "writers");
    if !writers.is_empty() {
        writers_section(&mut out, &writers)?;
    }
    let cross: Vec<(System, CrossResult)> = results_of(&lines, "cross");
    if !cross.is_empty() {
        cross_section(&mut out, &cross)?;
    }
    std::fs::write(md, out)?;
    Ok(())
}

fn fanout_section(out: &mut String, rows: &[(System, FanoutResult)], chart_link: &str) -> anyhow::Result<()> {
    let rate = rows.first().map_or(0.0, |r| r.1.rate);
    writeln!(
        out,
        "### Fan-out: one writer, N readers in one room, {rate:.0} updates/s\n"
    )?;
    writeln!(
        out,
        "Latency from the writer's send to the last reader's receipt; server CPU = utime + stime of the server process during the measured phase, divided by the messages delivered. Ratios: to the best anchor at the same N, and to the bare relay (`driftsync-bench relay`: relays each message to the room's other connections, applies and stores nothing; the floor of this machine) at the same N (below 1 is better).\n"
    )?;
    writeln!(
        out,
        "| N | system | p50 ms | p99 ms | max ms | server CPU µs/msg | delivered | server RSS MB | p99 / best anchor | CPU / best anchor | p99 / floor | CPU / floor |"
    )?;
    writeln!(out, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    let mut ns: Vec<usize> = rows.iter().map(|r| r.1.readers).collect();
    ns.sort_unstable();
    ns.dedup();
    for n in ns {
        let at: Vec<&(System, FanoutResult)> = rows.iter().filter(|r| r.1.readers == n).collect();
        let p99: BTreeMap<usize, f64> = at.iter().map(|r| (idx(r.0), r.1.latency.p99_us)).collect();
        let cpu: BTreeMap<usize, f64> = at.iter().map(|r| (idx(r.0), r.1.cpu_per_delivery_us)).collect();
        let (bp, bc) = (best_anchor(&p99, false), best_anchor(&cpu, false));
        let floor = at.iter().find(|r| r.0 == System::Relay).map(|r| &r.1);
        let (fp, fc) = (floor.map(|f| f.latency.p99_us), floor.map(|f| f.cpu_per_delivery_us));
        for s in ORDER {
            let Some((_, r)) = at.iter().find(|r| r.0 == s) else {
                continue;
            };
            let expected = u64::from(r.updates) * r.readers as u64;
            writeln!(
                out,
                "| {n} | {} | {} | {} | {} | {:.1} | {:.1} % | {:.0} | {} | {} | {} | {} |",
                label(s),
                ms(r.latency.p50_us),
                ms(r.latency.p99_us),
                ms(r.latency.max_us),
                r.cpu_per_delivery_us,
                100.0 * r.deliveries as f64 / expected.max(1) as f64,
                r.server_rss as f64 / 1e6,
                ratio(r.latency.p99_us, bp),
                ratio(r.cpu_per_delivery_us, bc),
                ratio(r.latency.p99_us, fp),
                ratio(r.cpu_per_delivery_us, fc),
            )?;
        }
    }
    writeln!(out, "\n![fan-out latency against N]({chart_link})\n")?;
    Ok(())
}

fn idle_section(out: &mut String, rows: &[(System, IdleResult)]) -> anyhow::Result<()> {
    writeln!(out, "### Idle connections\n")?;
    let doc = rows.first().map_or(0, |r| r.1.doc_bytes);
    writeln!(
        out,
        "Every room holds the same small document ({doc} B encoded: 100 words typed at scattered places). Server VmRSS with every connection open and idle, minus the RSS before the first connection (each configuration on a freshly started server). Per connection and per room are separated by solving the two configurations (one and ten connections per room) for the same number of connections: RSS(1/room) = C·(conn + room), RSS(10/room) = C·conn + C/10·room.\n"
    )?;
    writeln!(
        out,
        "| connections | system | +RSS 1/room MB | +RSS 10/room MB | per connection B | per room B | room / document | per conn / best anchor | per room / best anchor |"
    )?;
    writeln!(out, "|---:|---|---:|---:|---:|---:|---:|---:|---:|")?;
    let mut cs: Vec<usize> = rows.iter().map(|r| r.1.connections).collect();
    cs.sort_unstable();
    cs.dedup();
    for c in cs {
        let mut conn_cost = BTreeMap::new();
        let mut room_cost = BTreeMap::new();
        let mut deltas = BTreeMap::new();
        for s in ORDER {
            let find = |per: usize| {
                rows.iter()
                    .find(|r| r.0 == s && r.1.connections == c && r.1.per_room == per)
                    .map(|r| r.1.rss_after.saturating_sub(r.1.rss_before) as f64)
            };
            let (Some(r1), Some(r10)) = (find(1), find(10)) else {
                continue;
            };
            let c = c as f64;
            let room = ((r1 - r10) / (0.9 * c)).max(0.0);
            let conn = (r1 / c - room).max(0.0);
            conn_cost.insert(idx(s), conn);
            room_cost.insert(idx(s), room);
            deltas.insert(idx(s), (r1, r10));
        }
        let (bc, br) = (best_anchor(&conn_cost, false), best_anchor(&room_cost, false));
        for (i, (r1, r10)) in &deltas {
            writeln!(
                out,
                "| {} | {} | {:.1} | {:.1} | {:.0} | {:.0} | {:.2} | {} | {} |",
                thousands(c as u64),
                label(ORDER[*i]),
                r1 / 1e6,
                r10 / 1e6,
                conn_cost[i],
                room_cost[i],
                room_cost[i] / doc.max(1) as f64,
                ratio(conn_cost[i], bc),
                ratio(room_cost[i], br),
            )?;
        }
    }
    writeln!(out)?;
    Ok(())
}

fn resync_section(out: &mut String, rows: &[(System, ResyncResult)]) -> anyhow::Result<()> {
    let first = &rows[0].1;
    writeln!(out, "### Resync of the B4 document\n")?;
    writeln!(
        out,
        "The server holds the whole B4 document ({} operations, {} B encoded): written as one update with the first {} operations, then the last 10,000 operations one update each. A client holding all but the last K operations connects and syncs; bytes are WebSocket message payloads each way, from the first message to synced (native: hello + resume; y-protocols: sync steps 1 and 2 both ways, the Hocuspocus framing's auth message included); time from the start of the TCP connect until the answer is in (median of {} runs). \"full\" is a client holding nothing. Floor = the encoded size of the K missed operations' own updates.\n",
        thousands(first.ops as u64),
        thousands(first.doc_bytes as u64),
        thousands((first.ops - crate::b4::TAIL) as u64),
        first.runs
    )?;
    writeln!(
        out,
        "| K missed | system | client → server B | server → client B | total B | time ms | floor B | total / floor | total / best anchor |"
    )?;
    writeln!(out, "|---:|---|---:|---:|---:|---:|---:|---:|---:|")?;
    let ks: Vec<Option<usize>> = first.rows.iter().map(|r| r.missing).collect();
    for k in ks {
        let at: Vec<(System, &crate::b4::ResyncRow)> = rows
            .iter()
            .filter_map(|(s, r)| r.rows.iter().find(|row| row.missing == k).map(|row| (*s, row)))
            .collect();
        let totals: BTreeMap<usize, f64> = at
            .iter()
            .map(|(s, r)| (idx(*s), (r.stats.bytes_up + r.stats.bytes_down) as f64))
            .collect();
        let best = best_anchor(&totals, false);
        for s in ORDER {
            let Some((_, r)) = at.iter().find(|(x, _)| *x == s) else {
                continue;
            };
            let total = r.stats.bytes_up + r.stats.bytes_down;
            let native = if s == System::Native {
                format!(
                    " (resume frames {} + {})",
                    thousands(r.stats.resume_up),
                    thousands(r.stats.resume_down)
                )
            } else {
                String::new()
            };
            writeln!(
                out,
                "| {} | {} | {} | {} | {}{} | {} | {} | {} | {} |",
                k.map_or("full".into(), |k| thousands(k as u64)),
                label(s),
                thousands(r.stats.bytes_up),
                thousands(r.stats.bytes_down),
                thousands(total),
                native,
                ms(r.stats.synced_us),
                thousands(r.floor as u64),
                if r.floor > 0 {
                    format!("{:.2}", total as f64 / r.floor as f64)
                } else {
                    "—".into()
                },
                ratio(total as f64, best),
            )?;
        }
    }
    writeln!(out)?;
    Ok(())
}

fn cold_section(out: &mut String, rows: &[&Line]) -> anyhow::Result<()> {
    writeln!(out, "### Cold load of the stored B4 document\n")?;
    writeln!(
        out,
        "The server is restarted on the data written by the resync workload; a client holding nothing connects. First content = from the start of the TCP connect to the first message carrying document content (the sync answer); complete = until 90 % of the document's encoded size has arrived (native: the `Resumed` frame). Warm = the same join right after, the document loaded.\n"
    )?;
    writeln!(
        out,
        "| system | cold: first content ms | cold: complete ms | warm: complete ms | cold first content / best anchor |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|")?;
    let parsed: Vec<(System, crate::b4::ColdResult)> = rows
        .iter()
        .filter_map(|l| Some((l.system, serde_json::from_value(l.result.clone()).ok()?)))
        .collect();
    let firsts: BTreeMap<usize, f64> = parsed.iter().map(|(s, r)| (idx(*s), r.cold.first_content_us)).collect();
    let best = best_anchor(&firsts, false);
    for s in ORDER {
        let Some((_, r)) = parsed.iter().find(|(x, _)| *x == s) else {
            continue;
        };
        writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            label(s),
            ms(r.cold.first_content_us),
            ms(r.cold.synced_us),
            ms(r.warm.synced_us),
            ratio(r.cold.first_content_us, best)
        )?;
    }
    let _ = rows.first().map(|l| &l.params);
    writeln!(out)?;
    Ok(())
}

fn throughput_section(out: &mut String, rows: &[(System, ThroughputResult)]) -> anyhow::Result<()> {
    let first = &rows[0].1;
    writeln!(out, "### Throughput: many rooms, ramped until p99 passes 50 ms\n")?;
    writeln!(
        out,
        "{} rooms with {} clients each (one writer, {} readers); the total update rate goes up in steps of {:.0} s; latency from send to the last reader of the room. Knee = the highest rate whose p99 stayed at or below 50 ms with at least 99 % of the messages delivered. Persistence on for every system.\n",
        first.rooms,
        first.clients_per_room,
        first.clients_per_room.saturating_sub(1),
        first.step_secs
    )?;
    writeln!(
        out,
        "| system | knee updates/s | deliveries/s at the knee | p99 ms at the knee | first failing step | knee / best anchor |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---|---:|")?;
    let knees: BTreeMap<usize, f64> = rows.iter().map(|(s, r)| (idx(*s), r.knee_rate)).collect();
    let best = best_anchor(&knees, true);
    for s in ORDER {
        let Some((_, r)) = rows.iter().find(|(x, _)| *x == s) else {
            continue;
        };
        let at = r.steps.iter().find(|st| st.rate == r.knee_rate);
        let fail = r
            .steps
            .iter()
            .find(|st| st.latency.p99_us > 50_000.0 || st.delivered < 0.99)
            .map_or("none (top of the ramp)".to_string(), |st| {
                format!(
                    "{:.0}/s: p99 {} ms, {:.1} % delivered, server CPU {:.0} %",
                    st.rate,
                    ms(st.latency.p99_us),
                    st.delivered * 100.0,
                    st.server_cpu * 100.0
                )
            });
        writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            label(s),
            thousands(r.knee_rate as u64),
            thousands((r.knee_rate * r.clients_per_room.saturating_sub(1) as f64) as u64),
            at.map_or("—".into(), |st| ms(st.latency.p99_us)),
            fail,
            ratio(r.knee_rate, best),
        )?;
    }
    writeln!(out)?;
    Ok(())
}

fn writers_section(out: &mut String, rows: &[(System, WritersResult)]) -> anyhow::Result<()> {
    writeln!(out, "### Many writers: chat-like rooms\n")?;
    writeln!(
        out,
        "Every writer is its own client (its own yrs client id) sending small real updates at the rate given, and receives the others' updates; readers only receive. Acknowledgement latency: from the `Push` sent to its `Ack` (driftsync native only: the server acknowledges once the update is durably stored). **The y-websocket protocol (driftsync /yjs, the y-websocket server, y-sweet) has no acknowledgements, and the Hocuspocus protocol's `SyncStatus` (driftsync /hocuspocus: sent after the durable commit; Hocuspocus: once applied, before its debounced store) is not timed: for those systems only the delivery latency is measured** (from the send to the last other client of the room; measured for native too). Committed = acknowledged updates per second of sending; delivered = messages received by the other clients per second of sending. Server CPU: share of one core and per delivered message, during the measured phase. Delivery p99 / best anchor below 1 is better.\n"
    )?;
    writeln!(
        out,
        "| rooms × (writers + readers), rate per writer | system | ack p50 / p99 ms | delivery p50 / p99 ms | committed updates/s | delivered msgs/s | delivered | server CPU | CPU µs/msg | server RSS MB | delivery p99 / best anchor |"
    )?;
    writeln!(out, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    let mut shapes: Vec<(usize, usize, usize, u64)> = rows.iter().map(|r| shape_key(&r.1)).collect();
    shapes.sort_unstable();
    shapes.dedup();
    for shape in shapes {
        let at: Vec<&(System, WritersResult)> = rows.iter().filter(|r| shape_key(&r.1) == shape).collect();
        let p99: BTreeMap<usize, f64> = at.iter().map(|r| (idx(r.0), r.1.delivery_latency.p99_us)).collect();
        let best = best_anchor(&p99, false);
        for s in ORDER {
            if let Some((_, r)) = at.iter().find(|r| r.0 == s) {
                writeln!(out, "{}", writers_row(s, r, best))?;
            }
        }
    }
    writeln!(out)?;
    Ok(())
}

/// What identifies a many-writers configuration: rooms, writers, readers, rate (in mHz).
fn shape_key(r: &WritersResult) -> (usize, usize, usize, u64) {
    (
        r.rooms,
        r.writers_per_room,
        r.readers_per_room,
        (r.rate_per_writer * 1000.0).round() as u64,
    )
}

/// One row of the many-writers table.
fn writers_row(s: System, r: &WritersResult, best: Option<f64>) -> String {
    let (ack, committed) = if r.acknowledges {
        (
            format!("{} / {}", ms(r.ack_latency.p50_us), ms(r.ack_latency.p99_us)),
            thousands(r.committed_per_s.round() as u64),
        )
    } else if s.hocuspocus_framing() {
        ("— (not timed)".to_string(), "—".to_string())
    } else {
        ("— (no acks)".to_string(), "—".to_string())
    };
    format!(
        "| {} × ({} + {}), {}/s | {} | {} | {} / {} | {} | {} | {:.1} % | {:.0} % | {:.1} | {:.0} | {} |",
        thousands(r.rooms as u64),
        r.writers_per_room,
        r.readers_per_room,
        r.rate_per_writer,
        label(s),
        ack,
        ms(r.delivery_latency.p50_us),
        ms(r.delivery_latency.p99_us),
        committed,
        thousands(r.delivered_per_s.round() as u64),
        100.0 * r.deliveries as f64 / r.expected_deliveries.max(1) as f64,
        100.0 * r.server_cpu,
        r.cpu_per_delivery_us,
        r.server_rss as f64 / 1e6,
        ratio(r.delivery_latency.p99_us, best),
    )
}

/// @y/hub's published cross-instance run (its README, on a laptop; not measured here): 1,500
/// observers over three instances, p50 and p99 in milliseconds.
pub const YHUB_READERS: usize = 1500;
/// See [`YHUB_READERS`].
pub const YHUB_INSTANCES: usize = 3;
/// See [`YHUB_READERS`].
pub const YHUB_P50_MS: f64 = 13.7;
/// See [`YHUB_READERS`].
pub const YHUB_P99_MS: f64 = 41.3;

/// Signed milliseconds, `+1.23` / `-0.40`.
fn delta_ms(us: f64) -> String {
    format!("{:+.2}", us / 1000.0)
}

fn cross_section(out: &mut String, rows: &[(System, CrossResult)]) -> anyhow::Result<()> {
    let rate = rows.first().map_or(0.0, |r| r.1.rate);
    let updates = rows.first().map_or(0, |r| r.1.updates);
    writeln!(
        out,
        "### Cross-instance fan-out: one writer, N readers spread over instances, {rate:.0} updates/s\n"
    )?;
    writeln!(out, "{updates} updates measured per run, after a warm-up.\n")?;
    writeln!(
        out,
        "Instances of one deployment: `driftsync serve` on one PostgreSQL database, sharing rooms through Redis pub/sub. The writer is on the first instance, the readers round-robin over all of them (with three: a third on the writer's instance), all in one room. Latency from the writer's send to each reader's receipt, every delivery counted (not only the last reader's, as in the fan-out table). Writer's instance / other instances: the readers on the writer's instance and those whose updates took the hop between instances; hop = other instances' p50 minus the writer's instance's, in the same run: driftsync sends an update to the writer's instance's readers before its commit and publishes it to the other instances once stored, so the hop includes the durable commit to PostgreSQL, which the writer's ack p50 (from its send to its `Ack`, after the commit; native only) shows. Against one instance: the same workload on one instance of the same PostgreSQL and Redis, started alone. Every instance is pinned to core 0 (on 2 cores, the three instances share that core), the generator to core 1; PostgreSQL and Redis are the machine's services, not pinned. Server CPU = utime + stime of all the instances, per delivered message. @y/hub's figures are as published (on a laptop), not measured here.\n"
    )?;
    writeln!(
        out,
        "| N readers | instances | system | p50 ms | p99 ms | max ms | writer's instance p50 / p99 ms | other instances p50 / p99 ms | hop p50 ms | writer's ack p50 ms | against one instance: Δ p50 / Δ p99 ms | delivered | server CPU µs/msg |"
    )?;
    writeln!(out, "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    let mut keys: Vec<(usize, usize, usize)> = rows
        .iter()
        .map(|(s, r)| (idx(*s), r.readers, usize::MAX - r.instances))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    // The last run of each configuration counts.
    let find = |s: usize, n: usize, k: usize| {
        rows.iter()
            .rev()
            .find(|(x, r)| idx(*x) == s && r.readers == n && r.instances == k)
    };
    let mut verdicts = Vec::new();
    for (s, n, k) in keys {
        let k = usize::MAX - k;
        let Some((system, r)) = find(s, n, k) else { continue };
        let one = if k > 1 { find(s, n, 1).map(|x| &x.1) } else { None };
        writeln!(out, "{}", cross_row(*system, r, one))?;
        if k == YHUB_INSTANCES && n == YHUB_READERS {
            verdicts.push(cross_verdict(*system, r, one));
        }
    }
    writeln!(
        out,
        "| {} | {} | @y/hub (published, on a laptop; not measured here) | {:.2} | {:.2} | — | — | — | — | — | — | — | — |",
        thousands(YHUB_READERS as u64),
        YHUB_INSTANCES,
        YHUB_P50_MS,
        YHUB_P99_MS
    )?;
    writeln!(out)?;
    for v in verdicts {
        writeln!(out, "{v}\n")?;
    }
    Ok(())
}

/// One row of the cross-instance table; `one`: the same workload on one instance.
fn cross_row(s: System, r: &CrossResult, one: Option<&CrossResult>) -> String {
    let split = |x: &crate::stats::Summary| {
        if x.count == 0 {
            "—".to_string()
        } else {
            format!("{} / {}", ms(x.p50_us), ms(x.p99_us))
        }
    };
    let hop = if r.instances > 1 && r.same_instance.count > 0 && r.other_instances.count > 0 {
        delta_ms(r.other_instances.p50_us - r.same_instance.p50_us)
    } else {
        "—".to_string()
    };
    let against = one.map_or("—".to_string(), |o| {
        format!(
            "{} / {}",
            delta_ms(r.latency.p50_us - o.latency.p50_us),
            delta_ms(r.latency.p99_us - o.latency.p99_us)
        )
    });
    let ack = if r.ack.count > 0 {
        ms(r.ack.p50_us)
    } else {
        "—".to_string()
    };
    format!(
        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} % | {:.1} |",
        thousands(r.readers as u64),
        r.instances,
        label(s),
        ms(r.latency.p50_us),
        ms(r.latency.p99_us),
        ms(r.latency.max_us),
        split(&r.same_instance),
        split(&r.other_instances),
        hop,
        ack,
        against,
        100.0 * r.deliveries as f64 / r.expected_deliveries.max(1) as f64,
        r.cpu_per_delivery_us,
    )
}

/// The targets of the cross-instance run at @y/hub's size: p99 at most half of its published
/// figure, the hop adding at most 1 ms at p50 (within the run, and against one instance).
fn cross_verdict(s: System, r: &CrossResult, one: Option<&CrossResult>) -> String {
    let met = |ok: bool| if ok { "met" } else { "**missed**" };
    let limit = YHUB_P99_MS / 2.0;
    let p99 = r.latency.p99_us / 1000.0;
    let hop = (r.other_instances.p50_us - r.same_instance.p50_us) / 1000.0;
    let mut v = format!(
        "{} at {} readers over {} instances: p99 {:.2} ms against at most {:.2} ms (half of @y/hub's {:.1} ms): {}; hop at p50 {:+.2} ms within the run (at most 1 ms): {}",
        label(s),
        thousands(r.readers as u64),
        r.instances,
        p99,
        limit,
        YHUB_P99_MS,
        met(p99 <= limit),
        hop,
        met(hop <= 1.0),
    );
    if let Some(o) = one {
        let d = (r.latency.p50_us - o.latency.p50_us) / 1000.0;
        let _ = write!(
            v,
            "; p50 {d:+.2} ms against one instance (at most 1 ms): {}",
            met(d <= 1.0)
        );
    }
    v.push('.');
    v
}

/// A TTF font on this machine, if any (DejaVu Sans, Liberation Sans, …).
fn find_font() -> Option<Vec<u8>> {
    let candidates = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    ];
    candidates.iter().find_map(|p| std::fs::read(p).ok())
}

/// Draws p99 (solid) and p50 (thin) fan-out latency against N, one colour per system.
fn draw_fanout(rows: &[(System, FanoutResult)], path: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let font = find_font().and_then(|bytes| {
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).ok()
    });
    let text = font.is_some();
    let max_n = rows.iter().map(|r| r.1.readers).max().unwrap_or(10) as f64;
    let max_ms = rows.iter().map(|r| r.1.latency.p99_us / 1000.0).fold(1.0, f64::max) * 1.15;
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if text {
        builder
            .caption("Fan-out: send → last reader latency against N", ("sans-serif", 22))
            .x_label_area_size(45)
            .y_label_area_size(60);
    } else {
        builder.x_label_area_size(0).y_label_area_size(0);
    }
    let mut chart = builder.build_cartesian_2d((5.0..max_n * 1.3).log_scale(), 0.0..max_ms)?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc("readers (N, log scale)")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc("latency, ms (thick: p99, thin: p50)")
            .label_style(("sans-serif", 14));
    } else {
        mesh.disable_x_axis().disable_y_axis();
    }
    mesh.draw()?;
    // One per system of `ORDER`, in its order.
    let colours: [RGBColor; ORDER.len()] = [
        RGBColor(0xd6, 0x27, 0x28),
        RGBColor(0xff, 0x7f, 0x0e),
        RGBColor(0xe3, 0x77, 0xc2),
        RGBColor(0x1f, 0x77, 0xb4),
        RGBColor(0x2c, 0xa0, 0x2c),
        RGBColor(0x94, 0x67, 0xbd),
        RGBColor(0x7f, 0x7f, 0x7f),
    ];
    for (i, s) in ORDER.iter().enumerate() {
        let mut pts: Vec<(f64, f64, f64)> = rows
            .iter()
            .filter(|r| r.0 == *s)
            .map(|r| {
                (
                    r.1.readers as f64,
                    r.1.latency.p99_us / 1000.0,
                    r.1.latency.p50_us / 1000.0,
                )
            })
            .collect();
        if pts.is_empty() {
            continue;
        }
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let c = colours[i];
        let series = chart.draw_series(LineSeries::new(pts.iter().map(|p| (p.0, p.1)), c.stroke_width(3)))?;
        if text {
            series
                .label(label(*s))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3)));
        }
        chart.draw_series(pts.iter().map(|p| Circle::new((p.0, p.1), 4, c.filled())))?;
        chart.draw_series(LineSeries::new(pts.iter().map(|p| (p.0, p.2)), c.stroke_width(1)))?;
    }
    if text {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 15))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_anchor_ignores_driftsync_and_zeros() {
        let mut v = BTreeMap::new();
        v.insert(idx(System::Native), 1.0);
        v.insert(idx(System::YWebsocket), 5.0);
        v.insert(idx(System::YSweet), 3.0);
        v.insert(idx(System::Hocuspocus), 0.0);
        assert_eq!(best_anchor(&v, false), Some(3.0));
        assert_eq!(best_anchor(&v, true), Some(5.0));
        assert_eq!(ratio(1.5, Some(3.0)), "0.50");
        assert_eq!(ratio(1.5, None), "—");
        // The relay is the floor, not an anchor.
        v.insert(idx(System::Relay), 0.5);
        assert_eq!(best_anchor(&v, false), Some(3.0));
    }

    fn writers_result(acknowledges: bool) -> WritersResult {
        let lat = |p50_us, p99_us| crate::stats::Summary {
            count: 10,
            p50_us,
            p99_us,
            max_us: p99_us,
            mean_us: p50_us,
        };
        WritersResult {
            rooms: 1000,
            writers_per_room: 5,
            readers_per_room: 0,
            rate_per_writer: 0.2,
            secs: 30.0,
            updates: 30_000,
            acknowledges,
            ack_latency: if acknowledges {
                lat(1500.0, 4000.0)
            } else {
                crate::stats::Summary::default()
            },
            delivery_latency: lat(800.0, 2000.0),
            acked: if acknowledges { 30_000 } else { 0 },
            committed_per_s: if acknowledges { 1000.0 } else { 0.0 },
            deliveries: 119_880,
            expected_deliveries: 120_000,
            delivered_per_s: 3996.0,
            refused: 0,
            server_cpu_s: 12.0,
            server_cpu: 0.4,
            cpu_per_delivery_us: 100.1,
            server_rss: 42_000_000,
            generator_lag_us: 100.0,
        }
    }

    #[test]
    fn writers_rows_say_when_there_are_no_acknowledgements() {
        let native = writers_row(System::Native, &writers_result(true), Some(4000.0));
        assert_eq!(
            native,
            "| 1,000 × (5 + 0), 0.2/s | driftsync native | 1.50 / 4.00 | 0.80 / 2.00 | 1,000 | 3,996 | 99.9 % | 40 % | 100.1 | 42 | 0.50 |"
        );
        let yws = writers_row(System::YWebsocket, &writers_result(false), None);
        assert!(yws.contains("| — (no acks) | 0.80 / 2.00 | — | 3,996 |"), "{yws}");
        let mut out = String::new();
        writers_section(
            &mut out,
            &[
                (System::YWebsocket, writers_result(false)),
                (System::Native, writers_result(true)),
            ],
        )
        .unwrap();
        // Native first (table order), its ratio to the only anchor.
        let rows: Vec<&str> = out.lines().filter(|l| l.starts_with("| 1,000")).collect();
        assert_eq!(rows.len(), 2);
        assert!(rows[0].contains("driftsync native") && rows[0].ends_with("| 1.00 |"));
        assert!(out.contains("no acknowledgements"));
    }

    fn cross_result(readers: usize, instances: usize, p50: f64, p99: f64, same: f64, other: f64) -> CrossResult {
        let lat = |p50_us: f64, p99_us: f64, count| crate::stats::Summary {
            count,
            p50_us,
            p99_us,
            max_us: p99_us * 2.0,
            mean_us: p50_us,
        };
        CrossResult {
            readers,
            instances,
            same_readers: readers.div_ceil(instances),
            rate: 20.0,
            updates: 200,
            deliveries: 200 * readers as u64,
            expected_deliveries: 200 * readers as u64,
            latency: lat(p50, p99, 200 * readers),
            same_instance: lat(same, p99, 200 * readers.div_ceil(instances)),
            other_instances: if instances > 1 {
                lat(other, p99, 200 * (readers - readers.div_ceil(instances)))
            } else {
                crate::stats::Summary::default()
            },
            last_reader: lat(p99, p99, 200),
            ack: lat(2000.0, 4000.0, 200),
            server_cpu_s: 1.0,
            cpu_per_delivery_us: 3.3,
            server_rss: 1,
            generator_lag_us: 10.0,
        }
    }

    #[test]
    fn cross_rows_compare_with_one_instance_and_yhub() {
        let rows = vec![
            (System::Native, cross_result(1500, 1, 3000.0, 6000.0, 3000.0, 0.0)),
            (System::Native, cross_result(1500, 3, 3500.0, 9000.0, 3000.0, 3800.0)),
            (System::Native, cross_result(100, 3, 500.0, 900.0, 450.0, 520.0)),
        ];
        let mut out = String::new();
        cross_section(&mut out, &rows).unwrap();
        let table: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("| 1") && !l.starts_with("| N"))
            .collect();
        // 100 × 3, then 1,500 × 3 and 1,500 × 1, then @y/hub.
        assert_eq!(table.len(), 4, "{out}");
        assert!(
            table[0].starts_with("| 100 | 3 | driftsync native | 0.50 | 0.90 |"),
            "{}",
            table[0]
        );
        assert!(
            table[0].contains("| +0.07 | 2.00 | — |"),
            "no one-instance run at 100: {}",
            table[0]
        );
        assert_eq!(
            table[1],
            "| 1,500 | 3 | driftsync native | 3.50 | 9.00 | 18.00 | 3.00 / 9.00 | 3.80 / 9.00 | +0.80 | 2.00 | +0.50 / +3.00 | 100.0 % | 3.3 |"
        );
        assert!(
            table[2].starts_with("| 1,500 | 1 | driftsync native | 3.00 | 6.00 |"),
            "{}",
            table[2]
        );
        assert!(table[2].contains("| 3.00 / 6.00 | — | — | 2.00 | — |"), "{}", table[2]);
        assert!(
            table[3].contains("@y/hub") && table[3].contains("| 13.70 | 41.30 |"),
            "{}",
            table[3]
        );
        assert!(
            out.contains("p99 9.00 ms against at most 20.65 ms (half of @y/hub's 41.3 ms): met; hop at p50 +0.80 ms within the run (at most 1 ms): met; p50 +0.50 ms against one instance (at most 1 ms): met."),
            "{out}"
        );
        let slow = vec![(System::Native, cross_result(1500, 3, 9000.0, 25000.0, 8000.0, 9500.0))];
        let mut out = String::new();
        cross_section(&mut out, &slow).unwrap();
        assert!(out.contains("p99 25.00 ms against at most 20.65 ms (half of @y/hub's 41.3 ms): **missed**; hop at p50 +1.50 ms within the run (at most 1 ms): **missed**."), "{out}");
    }

    fn fanout_result(readers: usize, p99_us: f64, cpu: f64) -> FanoutResult {
        FanoutResult {
            readers,
            rate: 100.0,
            updates: 1000,
            deliveries: 1000 * readers as u64,
            latency: crate::stats::Summary {
                count: 1000,
                p50_us: p99_us / 2.0,
                p99_us,
                max_us: p99_us * 2.0,
                mean_us: p99_us / 2.0,
            },
            server_cpu_s: 1.0,
            cpu_per_delivery_us: cpu,
            server_rss: 20_000_000,
            generator_lag_us: 10.0,
        }
    }

    #[test]
    fn driftsyncs_hocuspocus_endpoint_is_compared_with_hocuspocus() {
        let rows = vec![
            (System::Hocuspocus, fanout_result(100, 6000.0, 14.0)),
            (System::DsHocuspocus, fanout_result(100, 3000.0, 7.0)),
            (System::Native, fanout_result(100, 1500.0, 3.5)),
        ];
        let mut out = String::new();
        fanout_section(&mut out, &rows, "chart.png").unwrap();
        let table: Vec<&str> = out.lines().filter(|l| l.starts_with("| 100 |")).collect();
        // driftsync's endpoints first, then the anchors; ratios against Hocuspocus, not itself.
        assert_eq!(table.len(), 3, "{out}");
        assert!(table[0].contains("| driftsync native |"), "{}", table[0]);
        assert!(
            table[1]
                .starts_with("| 100 | driftsync /hocuspocus | 1.50 | 3.00 | 6.00 | 7.0 | 100.0 % | 20 | 0.50 | 0.50 |"),
            "{}",
            table[1]
        );
        assert!(table[2].contains("| Hocuspocus 3.4.4 |") && table[2].contains("| 1.00 | 1.00 |"));
        // Its SyncStatus is not timed as an acknowledgement.
        let row = writers_row(System::DsHocuspocus, &writers_result(false), None);
        assert!(
            row.contains("| driftsync /hocuspocus | — (not timed) | 0.80 / 2.00 | — |"),
            "{row}"
        );
        let chart = std::env::temp_dir().join(format!("dsb-chart-{}.png", std::process::id()));
        draw_fanout(&rows, &chart).unwrap();
        assert!(std::fs::metadata(&chart).unwrap().len() > 0);
        let _ = std::fs::remove_file(&chart);
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(259_778), "259,778");
    }
}
