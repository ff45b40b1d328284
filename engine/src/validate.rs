//! Structural checks of untrusted yrs v1 bytes, run before yrs sees them.
//!
//! yrs reserves memory for the counts an input *declares* before it reads the elements: the
//! 8-byte state vector `ff ff ff ff ff ff ff 0f` declares 2^32 − 1 entries, and a `HashMap`
//! reservation of that size writes gigabytes of control bytes before the decoder notices that
//! the entries are not there. lib0's `Any` encoding is recursive, and yrs decodes it recursively,
//! so a deep enough nesting of arrays overflows the stack (an abort, not a panic). Several
//! `u32` clock sums overflow (a panic in debug builds, silent wrap-around in release builds).
//! See `fixtures/crashers/README.md` for each input and what yrs 0.28 does with it.
//!
//! [`check_state_vector`] and [`check_update`] walk the whole v1 grammar exactly as yrs 0.28's
//! `StateVector::decode` and `Update::decode` read it (`yrs/src/state_vector.rs`,
//! `update.rs` `Update::decode`/`decode_block`, `block.rs` `ItemContent::decode`,
//! `types/mod.rs` `TypeRef::decode`, `doc.rs` `Options::decode`, `any.rs` `Any::decode`,
//! `id_set.rs` `IdSet::decode`, `updates/decoder.rs` `DecoderV1`), without allocating anything
//! per declared element and without recursion. They accept a subset of what yrs accepts:
//!
//! * every declared count must be payable by the bytes that remain (each element takes at least
//!   one byte, most at least two), so the walk stops at the first count that lies;
//! * a varint must fit the integer yrs reads it into (yrs silently wraps `u32` varints longer
//!   than 32 bits) and is at most 10 bytes long;
//! * client ids are below 2^53 (yrs's `ClientID::new` asserts it in debug builds and silently
//!   drops the high bits in release builds, so 2^53 + 5 would alias client 5);
//! * the clocks of a client group end at or below [`MAX_CLOCK`] (2^31 − 1: yrs integrates with
//!   `local_clock as i32 - clock as i32`, which overflows — a panic in debug builds — when a
//!   clock of 2^31 or more arrives at a document that lacks the clocks before it), and every
//!   delete-set range ends at or below `u32::MAX` (yrs computes `clock + len` unchecked);
//! * strings are UTF-8 (as yrs requires); `Any` values nest at most [`MAX_ANY_DEPTH`] deep;
//! * bytes after the end of the encoding are refused (yrs ignores them);
//! * a client appears in at most one client group (yrs appends a second group to the first, with
//!   clocks restarting) and at most once in the delete set (yrs keeps only the last entry); no
//!   encoder writes either;
//! * an item never references an ID of its own client at or above its own clock (yrs would wait
//!   for it forever; no encoder writes that);
//! * info bytes with the unused bit `0x10` set, and parent infos other than 0 and 1, are refused
//!   (yrs ignores the bit and reads any parent info other than 1 as 0);
//! * `ContentJSON` (content ref 2) is refused: yrs 0.28 reads `count + 1` strings but writes
//!   `count`, so a document holding one encodes itself (snapshots, diffs, the whole state) into
//!   bytes yrs cannot decode — a 14-byte update would make a stored document unloadable. Yjs
//!   has not written ContentJSON since version 13 (it writes `ContentAny`), and yrs never does;
//! * subdocuments (`ContentDoc`, content ref 9) are refused: yrs 0.28 leaks every subdocument
//!   integrated into a `Doc` when that `Doc` is dropped (about 2.5 KB each, measured), and the
//!   server drops and reloads documents all the time, so a 4 MiB update of ~600,000 subdocuments
//!   would leak over a gigabyte per reload. driftsync does not use subdocuments; to accept them
//!   again, remove the refusal in `check_item` (the grammar is still checked in
//!   `check_content`).
//!
//! What is left to yrs: the JSON text of `Embed` and `Format` contents (yrs parses it with
//! serde_json, whose nesting limit is 128; an invalid text is a decode error, not a panic).
//!
//! Another place where yrs 0.28 reads differently from Yjs, and the checker follows yrs: an
//! `XmlHook` type (type ref 5) has no hook name after it for yrs (Yjs writes one), so a Yjs
//! update holding one is misread by yrs with or without the checker (and most likely refused).
//!
//! Both checks run in time linear in the input and allocate only the summary, which is linear in
//! the input too (see [`UpdateSummary`]).

use std::fmt;

/// Client ids are below this (JavaScript numbers hold 53 bits exactly).
pub const MAX_CLIENT_ID: u64 = 1 << 53;

/// The highest clock a client group may reach (see the module docs): no client writes two
/// billion operations, and yrs's integration computes clock differences as `i32`.
pub const MAX_CLOCK: u32 = i32::MAX as u32;

/// How deep lib0 `Any` containers (arrays and maps) may nest. 128 is serde_json's own limit, so
/// every value a client builds from JSON fits; yrs's recursive decoder needs a few hundred bytes
/// of stack per level, so this stays far from any thread's stack size.
pub const MAX_ANY_DEPTH: usize = 128;

/// Why bytes are not an acceptable yrs v1 encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Error {
    offset: usize,
    kind: ErrorKind,
}

impl Error {
    /// Byte offset into the input where the problem was found.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// What the problem is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
}

/// The kinds of [`Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The input ends in the middle of a value.
    UnexpectedEnd,
    /// A varint is longer than 10 bytes, or longer than the integer it is read into allows.
    VarIntTooLong,
    /// A varint's value does not fit the integer yrs reads it into.
    IntegerTooLarge,
    /// A declared count (or length) is larger than the bytes that remain could hold.
    CountTooLarge,
    /// A client id is 2^53 or more.
    ClientIdTooLarge,
    /// A client group's clocks end beyond [`MAX_CLOCK`], or a delete-set range beyond `u32::MAX`.
    ClockOverflow,
    /// A string is not UTF-8.
    InvalidUtf8,
    /// A struct info byte yrs does not know (or one with the unused bit `0x10` set).
    UnknownStruct(u8),
    /// A GC or Skip struct of length 0 (yrs refuses those too).
    EmptyBlock,
    /// A parent info other than 0 (an ID) or 1 (a root name).
    UnknownParentInfo,
    /// A `ContentJSON` item, which yrs 0.28 cannot round-trip (see the module docs).
    JsonContent,
    /// A subdocument (`ContentDoc`), which yrs 0.28 leaks (see the module docs).
    SubdocContent,
    /// A type ref yrs does not know (weak links need yrs's `weak` feature, which is off).
    UnknownTypeRef(u8),
    /// A lib0 `Any` tag yrs does not know.
    UnknownAnyTag(u8),
    /// `Any` containers nest deeper than [`MAX_ANY_DEPTH`].
    AnyTooDeep,
    /// An item references an ID of its own client at or above its own clock.
    ForwardReference,
    /// A client has two client groups, or two entries in the delete set.
    DuplicateClient,
    /// Bytes follow the end of the encoding.
    TrailingBytes,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorKind::UnexpectedEnd => f.write_str("unexpected end of input"),
            ErrorKind::VarIntTooLong => f.write_str("varint too long"),
            ErrorKind::IntegerTooLarge => f.write_str("integer too large"),
            ErrorKind::CountTooLarge => f.write_str("declared count larger than the input"),
            ErrorKind::ClientIdTooLarge => f.write_str("client id not below 2^53"),
            ErrorKind::ClockOverflow => f.write_str("clock range too high"),
            ErrorKind::InvalidUtf8 => f.write_str("string is not UTF-8"),
            ErrorKind::UnknownStruct(info) => write!(f, "unknown struct info {info:#04x}"),
            ErrorKind::EmptyBlock => f.write_str("GC or Skip struct of length 0"),
            ErrorKind::UnknownParentInfo => f.write_str("unknown parent info"),
            ErrorKind::JsonContent => f.write_str("ContentJSON (content ref 2) is not supported"),
            ErrorKind::SubdocContent => f.write_str("subdocuments (content ref 9) are not supported"),
            ErrorKind::UnknownTypeRef(r) => write!(f, "unknown type ref {r}"),
            ErrorKind::UnknownAnyTag(t) => write!(f, "unknown Any tag {t}"),
            ErrorKind::AnyTooDeep => write!(f, "Any values nested deeper than {MAX_ANY_DEPTH}"),
            ErrorKind::ForwardReference => f.write_str("item references its own client's future"),
            ErrorKind::DuplicateClient => f.write_str("client listed twice"),
            ErrorKind::TrailingBytes => f.write_str("bytes after the end of the encoding"),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at byte {}", self.kind, self.offset)
    }
}

impl std::error::Error for Error {}

/// One client group of an update: the structs of `client` with clocks `start..end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientGroup {
    /// The client id.
    pub client: u64,
    /// Clock of the group's first struct.
    pub start: u32,
    /// Clock after the group's last struct (`start` for a group without structs). GC and Skip
    /// structs are counted, so `start..end` spans every struct of the group; which clocks the
    /// update actually carries is in [`UpdateSummary::carried`].
    pub end: u32,
}

/// What [`check_update`] learned about an update.
///
/// Allocation bound: every entry of every list consumes distinct input bytes — a client group at
/// least 3, a carried range, a reference or a delete-set range at least 2 — and takes 16 bytes,
/// so the summary holds at most 8 bytes of entries per input byte (twice that with `Vec`
/// growth slack): linear in the input, and never more than the input declares *and contains*.
/// (The check also keeps the clients of the groups and of the delete set, 16 bytes per at least
/// 2 input bytes, until it returns.)
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpdateSummary {
    /// The client groups, in input order.
    pub groups: Vec<ClientGroup>,
    /// The clock ranges the update carries, as `(client, start, end)`, sorted by client and
    /// clock, adjacent structs merged: every item and GC struct, not Skip structs (they are holes:
    /// yrs writes them where a merged update lacks clocks) and not empty items (yrs drops those
    /// while decoding). This is the set yrs's `Update::insertions(true)` reports.
    pub carried: Vec<(u64, u32, u32)>,
    /// The IDs of *other* clients the items reference, as `(client, clock)`: left origins, right
    /// origins, and parents given as an ID (not root names), in input order, consecutive
    /// duplicates dropped. References to the item's own client always point below its own clock
    /// (anything else is refused), so they are implied by the group starting where the receiver
    /// is, and are not listed.
    pub references: Vec<(u64, u32)>,
    /// The delete set as `(client, clock, len)`, in input order, empty ranges dropped.
    pub deletes: Vec<(u64, u32, u32)>,
    /// How many structs (items, GC and Skip) the update holds.
    pub structs: usize,
    /// What squashing the update's runs will cost yrs, in clocks copied: when it integrates an
    /// update, yrs merges each item that continues the previous one (same client, next clock,
    /// origin at its end; string or `Any` content) into it, copying the run's content so far —
    /// time and memory quadratic in a run's length. The sum, over such items, of their run's
    /// length so far. Callers bound it (`sync::MAX_SQUASH_WORK`).
    pub squash_work: u64,
    /// Where the delete set starts in the input: the bytes before it are the structs.
    pub delete_set_at: usize,
}

impl UpdateSummary {
    /// Whether the update carries no struct and deletes nothing.
    pub fn is_empty(&self) -> bool {
        self.carried.is_empty() && self.deletes.is_empty()
    }

    /// Whether the update carries every struct of `client` at clocks `start..end`.
    pub fn carries_range(&self, client: u64, start: u32, end: u32) -> bool {
        if start >= end {
            return true;
        }
        // Adjacent structs are merged, so a covered range lies within one carried range.
        let i = self
            .carried
            .partition_point(|&(c, first, _)| (c, first) <= (client, start));
        i > 0 && {
            let (c, _, last) = self.carried[i - 1];
            c == client && start < last && end <= last
        }
    }

    /// Whether the update carries the struct of `client` at `clock`.
    pub fn carries(&self, client: u64, clock: u32) -> bool {
        // `carried` is sorted by (client, start) and its ranges are disjoint.
        let i = self
            .carried
            .partition_point(|&(c, start, _)| (c, start) <= (client, clock));
        i > 0 && {
            let (c, _, end) = self.carried[i - 1];
            c == client && clock < end
        }
    }
}

/// Whether a document whose state vector is `have` holds everything `summary`'s update builds on,
/// so that yrs integrates all of it, contiguously, instead of keeping part of it as pending.
///
/// True when every carried range of every client starts at or below what the document has of
/// that client (after Skip holes the next range must be covered by the document on its own), and
/// every referenced ID of another client is below what the document has of it or carried by the
/// update itself.
///
/// This is stricter than yrs 0.28 itself: yrs keeps a struct pending only when an ID it
/// references is missing; a struct whose own client's earlier clocks are missing but whose
/// references are present is integrated behind a Skip hole (the document's state vector stays
/// below the hole, and the hole is filled when the missing clocks arrive). A server that refuses
/// updates failing this check never stores a document with holes.
///
/// Deletions are not dependencies here: yrs applies what it can of a delete set and keeps
/// deletions of items it does not have yet as a pending delete set, retried with every later
/// update (`Store::pending_ds`), so they never block integration. A reference cycle between
/// clients inside one update (no honest encoder writes one) is not detected: yrs would keep such
/// an update pending, so callers still check yrs's pending state after applying.
pub fn dependencies_satisfied(summary: &UpdateSummary, have: impl Fn(u64) -> u32) -> bool {
    let mut current: Option<(u64, u32)> = None;
    for &(client, start, end) in &summary.carried {
        let frontier = match current {
            Some((c, frontier)) if c == client => frontier,
            _ => have(client),
        };
        if start > frontier {
            return false;
        }
        current = Some((client, frontier.max(end)));
    }
    summary
        .references
        .iter()
        .all(|&(client, clock)| clock < have(client) || summary.carries(client, clock))
}

/// Checks a v1-encoded state vector; returns its number of entries.
///
/// yrs reads `count` then `count` pairs of (client varint, clock varint) and ignores what
/// follows; here every entry must be present (the count is checked against the input length
/// first, at two bytes per entry), clients must be below 2^53, clocks must fit `u32`, and
/// nothing may follow. A client listed twice is accepted (yrs keeps the last clock).
pub fn check_state_vector(bytes: &[u8]) -> Result<usize, Error> {
    let mut r = Reader::new(bytes);
    let count = r.count(2)?;
    for _ in 0..count {
        r.client()?;
        r.var_u32()?;
    }
    r.finish()?;
    Ok(count)
}

/// Struct info byte of a GC struct.
const GC: u8 = 0;
/// Struct info byte of a Skip struct.
const SKIP: u8 = 10;
/// Info bit: the item has a left origin.
const HAS_ORIGIN: u8 = 0x80;
/// Info bit: the item has a right origin.
const HAS_RIGHT_ORIGIN: u8 = 0x40;
/// Info bit: the item has a parent sub (map key); only read when neither origin is present.
const HAS_PARENT_SUB: u8 = 0x20;
/// Info bit yrs ignores and Yjs reads as part of the content ref; no encoder sets it.
const UNUSED_INFO_BIT: u8 = 0x10;

/// Checks a v1-encoded update from untrusted bytes; returns what the server needs to know about
/// it before applying it (see [`UpdateSummary`]).
///
/// The grammar (yrs 0.28, `Update::decode`): `groups` client groups, each `structs`, `client`,
/// `start clock`, then `structs` structs; then the delete set: `clients`, each `client`,
/// `ranges`, then `ranges` pairs of (clock, len). A struct is an info byte: 0 = GC and 10 = Skip,
/// each with a length; otherwise an item: a left origin ID if `info & 0x80`, a right origin ID if
/// `info & 0x40`; with neither, a parent info (1: a root name string; 0: the parent's ID) and, if
/// `info & 0x20`, a parent sub string; then the content chosen by `info & 0x0f`: 1 Deleted
/// (len), 2 JSON (count, then count + 1 strings in yrs; refused here), 3 Binary (buffer),
/// 4 String, 5 Embed (JSON string), 6 Format (key, JSON string), 7 Type (a type ref byte;
/// XmlElement (3) is followed by its name), 8 Any (count, then count lib0 values), 9 Doc (guid
/// string, one lib0 value of options; refused here). An ID is a client varint and a clock
/// varint.
pub fn check_update(bytes: &[u8]) -> Result<UpdateSummary, Error> {
    let mut r = Reader::new(bytes);
    let mut summary = UpdateSummary::default();
    // A group takes at least 3 bytes: struct count, client and clock.
    let groups = r.count(3)?;
    let mut grouped = Vec::with_capacity(groups);
    for _ in 0..groups {
        // A struct takes at least 2 bytes: GC and Skip are info + length, an item is info +
        // content at the least.
        let structs = r.count(2)?;
        summary.structs += structs;
        let at = r.pos;
        let client = r.client()?;
        grouped.push((client, at));
        let start_at = r.pos;
        let start = r.var_u32()?;
        if start > MAX_CLOCK {
            return Err(r.error_at(start_at, ErrorKind::ClockOverflow));
        }
        let mut clock = start;
        // The carried range being built: (start, end).
        let mut run: Option<(u32, u32)> = None;
        // The clocks of the squashable run the previous struct ended (0: none).
        let mut squash_run: u64 = 0;
        for _ in 0..structs {
            let at = r.pos;
            let info = r.u8()?;
            let (len, carried) = match info {
                GC | SKIP => {
                    let len = r.var_u32()?;
                    if len == 0 {
                        return Err(r.error_at(at, ErrorKind::EmptyBlock));
                    }
                    squash_run = 0;
                    (len, info == GC)
                }
                _ => {
                    let (len, continues) = check_item(&mut r, &mut summary.references, info, client, clock)?;
                    squash_run = if continues && squash_run > 0 {
                        squash_run + u64::from(len)
                    } else if continues || matches!(info & 0x0f, 4 | 8) {
                        u64::from(len)
                    } else {
                        0
                    };
                    if continues {
                        summary.squash_work = summary.squash_work.saturating_add(squash_run);
                    }
                    (len, true)
                }
            };
            let end = clock
                .checked_add(len)
                .filter(|&end| end <= MAX_CLOCK)
                .ok_or(r.error_at(at, ErrorKind::ClockOverflow))?;
            if len > 0 {
                run = match run {
                    Some((s, e)) if carried && e == clock => Some((s, end)),
                    _ => {
                        if let Some((s, e)) = run {
                            summary.carried.push((client, s, e));
                        }
                        carried.then_some((clock, end))
                    }
                };
            }
            clock = end;
        }
        if let Some((s, e)) = run {
            summary.carried.push((client, s, e));
        }
        summary.groups.push(ClientGroup {
            client,
            start,
            end: clock,
        });
    }
    // The delete set: a client takes at least 2 bytes (client, range count), a range 2 (clock,
    // len).
    summary.delete_set_at = r.pos;
    let clients = r.count(2)?;
    let mut deleting = Vec::with_capacity(clients);
    for _ in 0..clients {
        let at = r.pos;
        let client = r.client()?;
        deleting.push((client, at));
        let ranges = r.count(2)?;
        for _ in 0..ranges {
            let at = r.pos;
            let clock = r.var_u32()?;
            let len = r.var_u32()?;
            if clock.checked_add(len).is_none() {
                return Err(r.error_at(at, ErrorKind::ClockOverflow));
            }
            if len > 0 {
                summary.deletes.push((client, clock, len));
            }
        }
    }
    r.finish()?;

    // Runs of one group are in clock order and groups are unique per client (checked next), so
    // sorting by (client, start) keeps each client's runs together and in order.
    summary.carried.sort_unstable();
    duplicate_client(&mut grouped)?;
    duplicate_client(&mut deleting)?;
    Ok(summary)
}

/// Refuses a client listed twice in `clients` (as `(client, offset)`). yrs appends a second
/// client group to the first with clocks restarting, and keeps only the last delete-set entry of
/// a client; no encoder writes either.
fn duplicate_client(clients: &mut [(u64, usize)]) -> Result<(), Error> {
    clients.sort_unstable();
    match clients.windows(2).find(|w| w[0].0 == w[1].0) {
        Some(w) => Err(Error {
            offset: w[1].1,
            kind: ErrorKind::DuplicateClient,
        }),
        None => Ok(()),
    }
}

/// Checks one item (its info byte already read); returns its length in clocks (0 for an item
/// yrs drops: an empty string, an empty Any list, a Deleted of length 0).
fn check_item(
    r: &mut Reader<'_>,
    references: &mut Vec<(u64, u32)>,
    info: u8,
    client: u64,
    clock: u32,
) -> Result<(u32, bool), Error> {
    let at = r.pos - 1;
    let content = info & 0x0f;
    if info & UNUSED_INFO_BIT != 0 || !(1..=9).contains(&content) {
        return Err(r.error_at(at, ErrorKind::UnknownStruct(info)));
    }
    if content == 2 {
        // ContentJSON: yrs reads a count and then count + 1 strings (`while remaining >= 0`) but
        // writes count strings (see the module docs).
        return Err(r.error_at(at, ErrorKind::JsonContent));
    }
    if content == 9 {
        // ContentDoc: yrs leaks integrated subdocuments (see the module docs).
        return Err(r.error_at(at, ErrorKind::SubdocContent));
    }
    let mut ids: [Option<(u64, u32)>; 3] = [None; 3];
    if info & HAS_ORIGIN != 0 {
        ids[0] = Some(r.id()?);
    }
    if info & HAS_RIGHT_ORIGIN != 0 {
        ids[1] = Some(r.id()?);
    }
    if info & (HAS_ORIGIN | HAS_RIGHT_ORIGIN) == 0 {
        let pi_at = r.pos;
        match r.var_u32()? {
            1 => {
                r.string()?;
            }
            0 => ids[2] = Some(r.id()?),
            _ => return Err(r.error_at(pi_at, ErrorKind::UnknownParentInfo)),
        }
        if info & HAS_PARENT_SUB != 0 {
            r.string()?;
        }
    }
    let len = check_content(r, content)?;
    // Whether yrs may squash it into the previous item: string or `Any` content whose origin is
    // the clock just before its own, of its own client.
    let continues = matches!(content, 4 | 8) && clock > 0 && ids[0] == Some((client, clock - 1));
    for (c, k) in ids.into_iter().flatten() {
        if c == client {
            if k >= clock {
                return Err(r.error_at(at, ErrorKind::ForwardReference));
            }
        } else if len > 0 && references.last() != Some(&(c, k)) {
            references.push((c, k));
        }
    }
    Ok((len, continues))
}

/// Checks an item's content; returns its length in clocks as yrs counts it.
fn check_content(r: &mut Reader<'_>, content: u8) -> Result<u32, Error> {
    Ok(match content {
        // Deleted: a length.
        1 => r.var_u32()?,
        // Binary.
        3 => {
            r.bytes()?;
            1
        }
        // String: its length in UTF-16 code units.
        4 => utf16_len(r.string()?),
        // Embed: a JSON string.
        5 => {
            r.string()?;
            1
        }
        // Format: a key and a JSON string.
        6 => {
            r.string()?;
            r.string()?;
            1
        }
        // Type: one type ref byte (yrs reads a byte, not a varint).
        7 => {
            let at = r.pos;
            match r.u8()? {
                // Array, Map, Text, XmlFragment, XmlHook (no name in yrs), XmlText, Doc, Undefined.
                0 | 1 | 2 | 4 | 5 | 6 | 9 | 15 => {}
                // XmlElement: its node name.
                3 => {
                    r.string()?;
                }
                other => return Err(r.error_at(at, ErrorKind::UnknownTypeRef(other))),
            }
            1
        }
        // Any: a count and that many values.
        8 => {
            let count = r.count(1)?;
            for _ in 0..count {
                check_any(r)?;
            }
            count as u32
        }
        // Doc: a guid and an options value. (Refused by check_item for now: see the module docs.)
        9 => {
            r.string()?;
            check_any(r)?;
            1
        }
        // 2 (JSON) is refused by check_item, like unknown refs.
        _ => unreachable!("content refs are checked by check_item"),
    })
}

/// Length of a string in UTF-16 code units: one per character, two for characters outside the
/// basic multilingual plane (their UTF-8 form starts with a byte ≥ 0xF0).
fn utf16_len(s: &str) -> u32 {
    let units = s
        .bytes()
        .map(|b| match b {
            0x80..=0xbf => 0u32,
            0xf0..=0xff => 2,
            _ => 1,
        })
        .sum::<u32>();
    units
}

/// Skips one lib0 `Any` value without recursion: `stack` holds, per open container, how many
/// elements it still expects and whether it is a map (whose elements are key + value).
fn check_any(r: &mut Reader<'_>) -> Result<(), Error> {
    let mut stack = [(0u64, false); MAX_ANY_DEPTH];
    let mut depth = 0usize;
    loop {
        // One value.
        let at = r.pos;
        match r.u8()? {
            // undefined, null, false, true
            127 | 126 | 121 | 120 => {}
            // integer
            125 => r.var_i64()?,
            // float32
            124 => r.skip(4)?,
            // float64, bigint
            123 | 122 => r.skip(8)?,
            // string
            119 => {
                r.string()?;
            }
            // buffer
            116 => {
                r.bytes()?;
            }
            // map, array
            tag @ (118 | 117) => {
                let is_map = tag == 118;
                if depth == MAX_ANY_DEPTH {
                    return Err(r.error_at(at, ErrorKind::AnyTooDeep));
                }
                // yrs reads the length as a u64; an element takes at least 1 byte, a map entry 2.
                let count_at = r.pos;
                let count = r.var_u64()?;
                if count > (r.remaining() / if is_map { 2 } else { 1 }) as u64 {
                    return Err(r.error_at(count_at, ErrorKind::CountTooLarge));
                }
                if count > 0 {
                    stack[depth] = (count, is_map);
                    depth += 1;
                    if is_map {
                        r.string()?;
                    }
                    continue;
                }
            }
            other => return Err(r.error_at(at, ErrorKind::UnknownAnyTag(other))),
        }
        // The value is complete: count it against the open containers.
        loop {
            if depth == 0 {
                return Ok(());
            }
            let (left, is_map) = &mut stack[depth - 1];
            *left -= 1;
            if *left == 0 {
                depth -= 1;
                continue;
            }
            if *is_map {
                r.string()?;
            }
            break;
        }
    }
}

/// A cursor over the input, reading lib0 v1 primitives the way yrs does, but strictly.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn error_at(&self, offset: usize, kind: ErrorKind) -> Error {
        Error { offset, kind }
    }

    fn finish(&self) -> Result<(), Error> {
        if self.remaining() > 0 {
            return Err(self.error_at(self.pos, ErrorKind::TrailingBytes));
        }
        Ok(())
    }

    fn u8(&mut self) -> Result<u8, Error> {
        let b = *self
            .buf
            .get(self.pos)
            .ok_or(self.error_at(self.pos, ErrorKind::UnexpectedEnd))?;
        self.pos += 1;
        Ok(b)
    }

    fn skip(&mut self, n: usize) -> Result<(), Error> {
        if n > self.remaining() {
            return Err(self.error_at(self.pos, ErrorKind::UnexpectedEnd));
        }
        self.pos += n;
        Ok(())
    }

    /// lib0 varUint into a u64: at most 10 bytes, no bit beyond the 64th.
    fn var_u64(&mut self) -> Result<u64, Error> {
        let at = self.pos;
        let mut value = 0u64;
        for i in 0..10 {
            let b = self.u8()?;
            let bits = u64::from(b & 0x7f);
            if i == 9 && bits > 1 {
                return Err(self.error_at(at, ErrorKind::IntegerTooLarge));
            }
            value |= bits << (7 * i);
            if b < 0x80 {
                return Ok(value);
            }
        }
        Err(self.error_at(at, ErrorKind::VarIntTooLong))
    }

    /// lib0 varUint into a u32 (yrs would wrap larger values silently).
    fn var_u32(&mut self) -> Result<u32, Error> {
        let at = self.pos;
        let value = self.var_u64()?;
        u32::try_from(value).map_err(|_| self.error_at(at, ErrorKind::IntegerTooLarge))
    }

    /// A client id: a varUint below 2^53.
    fn client(&mut self) -> Result<u64, Error> {
        let at = self.pos;
        let value = self.var_u64()?;
        if value >= MAX_CLIENT_ID {
            return Err(self.error_at(at, ErrorKind::ClientIdTooLarge));
        }
        Ok(value)
    }

    /// An ID: client and clock.
    fn id(&mut self) -> Result<(u64, u32), Error> {
        Ok((self.client()?, self.var_u32()?))
    }

    /// A count of elements taking at least `min_size` bytes each, which must fit in what remains.
    fn count(&mut self, min_size: usize) -> Result<usize, Error> {
        let at = self.pos;
        let count = self.var_u32()? as usize;
        if count > self.remaining() / min_size {
            return Err(self.error_at(at, ErrorKind::CountTooLarge));
        }
        Ok(count)
    }

    /// lib0 varInt (signed: 6 bits and a sign bit in the first byte, 7 bits in each next one).
    /// yrs shifts with `<<` and negates with `-`, so an 11th byte (a shift by 69 bits) and the
    /// magnitude 2^63 with the sign bit (negating `i64::MIN`) panic in debug builds. At most 10
    /// bytes, magnitude below 2^63.
    fn var_i64(&mut self) -> Result<(), Error> {
        let at = self.pos;
        let first = self.u8()?;
        let mut magnitude = u128::from(first & 0x3f);
        let mut more = first >= 0x80;
        let mut shift = 6;
        while more {
            if shift > 62 {
                return Err(self.error_at(at, ErrorKind::VarIntTooLong));
            }
            let b = self.u8()?;
            magnitude |= u128::from(b & 0x7f) << shift;
            shift += 7;
            more = b >= 0x80;
        }
        if magnitude >= 1 << 63 {
            return Err(self.error_at(at, ErrorKind::IntegerTooLarge));
        }
        Ok(())
    }

    /// A varUint8Array: a u32 length and that many bytes.
    fn bytes(&mut self) -> Result<&'a [u8], Error> {
        let at = self.pos;
        let len = self.var_u32()? as usize;
        if len > self.remaining() {
            return Err(self.error_at(at, ErrorKind::CountTooLarge));
        }
        let bytes = &self.buf[self.pos..self.pos + len];
        self.pos += len;
        Ok(bytes)
    }

    /// A varString: UTF-8 bytes.
    fn string(&mut self) -> Result<&'a str, Error> {
        let at = self.pos;
        let bytes = self.bytes()?;
        std::str::from_utf8(bytes).map_err(|_| self.error_at(at, ErrorKind::InvalidUtf8))
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use proptest::prelude::*;
    use yrs::types::Attrs;
    use yrs::updates::decoder::Decode;
    use yrs::updates::encoder::Encode;
    use yrs::{
        Any, Array, ArrayPrelim, Doc, GetString, Map, MapPrelim, ReadTxn, StateVector, Text, Transact, Update, Xml,
        XmlElementPrelim, XmlFragment, XmlTextPrelim,
    };

    use super::*;
    use crate::fuzz::compare_with_yrs;

    /// lib0 varUint.
    fn v(mut n: u64) -> Vec<u8> {
        let mut out = Vec::new();
        while n >= 0x80 {
            out.push((n as u8 & 0x7f) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
        out
    }

    /// lib0 varString.
    fn s(text: &str) -> Vec<u8> {
        [v(text.len() as u64), text.as_bytes().to_vec()].concat()
    }

    /// Checks an update yrs produced: accepted, and the summary agrees with yrs's decoding.
    fn accepted(update: &[u8]) -> UpdateSummary {
        let summary = check_update(update).unwrap_or_else(|e| panic!("{e}: {update:02x?}"));
        let decoded = Update::decode_v1(update).unwrap();
        compare_with_yrs(&summary, &decoded).unwrap();
        summary
    }

    fn refused(update: &[u8]) -> ErrorKind {
        match check_update(update) {
            Ok(summary) => panic!("accepted {update:02x?}: {summary:?}"),
            Err(e) => e.kind(),
        }
    }

    fn have(doc: &Doc) -> impl Fn(u64) -> u32 {
        let sv = doc.transact().state_vector();
        move |client| sv.get(&yrs::ClientID::new(client))
    }

    fn pending(doc: &Doc) -> bool {
        doc.transact().store().pending_update().is_some()
    }

    #[test]
    fn the_reported_bombs_are_refused_at_once() {
        let sv_bomb = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0f];
        let update_bomb = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01, 0x65, 0x01, 0x1d, 0x01,
        ];
        let start = Instant::now();
        for _ in 0..1000 {
            assert!(check_state_vector(&sv_bomb).is_err());
            assert!(check_update(&update_bomb).is_err());
        }
        // A thousand rounds of both: microseconds each.
        assert!(start.elapsed() < Duration::from_millis(100), "{:?}", start.elapsed());
        // The count is read as a u32 and refused: it cannot fit in the bytes that follow.
        assert_eq!(
            check_state_vector(&sv_bomb).unwrap_err().kind(),
            ErrorKind::IntegerTooLarge
        );
        assert_eq!(
            check_update(&[0xff, 0xff, 0xff, 0xff, 0x0f, 1]).unwrap_err().kind(),
            ErrorKind::CountTooLarge
        );
    }

    #[test]
    fn state_vectors_round_trip() {
        let doc = crate::doc::new_doc(MAX_CLIENT_ID - 1).unwrap();
        crate::doc::text_insert(&doc, 0, "hello").unwrap();
        let other = crate::doc::new_doc(7).unwrap();
        crate::doc::apply_bytes(&other, &crate::doc::encode_state(&doc)).unwrap();
        crate::doc::text_insert(&other, 0, "x").unwrap();
        let sv = crate::doc::state_vector(&other);
        assert_eq!(check_state_vector(&sv), Ok(2));
        assert_eq!(check_state_vector(&StateVector::default().encode_v1()), Ok(0));
        // Trailing bytes, a client of 2^53, a clock beyond u32, a truncated entry.
        assert_eq!(
            check_state_vector(&[sv.clone(), vec![0]].concat()).unwrap_err().kind(),
            ErrorKind::TrailingBytes
        );
        assert_eq!(
            check_state_vector(&[v(1), v(MAX_CLIENT_ID), v(1)].concat())
                .unwrap_err()
                .kind(),
            ErrorKind::ClientIdTooLarge
        );
        assert_eq!(
            check_state_vector(&[v(1), v(1), v(1 << 32)].concat())
                .unwrap_err()
                .kind(),
            ErrorKind::IntegerTooLarge
        );
        assert_eq!(
            check_state_vector(&[1, 1]).unwrap_err().kind(),
            ErrorKind::CountTooLarge
        );
        assert_eq!(
            check_state_vector(&[2, 1, 1, 1]).unwrap_err().kind(),
            ErrorKind::CountTooLarge
        );
        assert_eq!(
            check_state_vector(&[1, 0x81, 0x81]).unwrap_err().kind(),
            ErrorKind::UnexpectedEnd
        );
        assert_eq!(check_state_vector(&[]).unwrap_err().kind(), ErrorKind::UnexpectedEnd);
        // Varints padded with zero groups are lib0-valid and read as yrs reads them.
        assert_eq!(check_state_vector(&[1, 0x81, 0x80, 0x00, 0x85, 0x00]), Ok(1));
        let padded = StateVector::decode_v1(&[1, 0x81, 0x80, 0x00, 0x85, 0x00]).unwrap();
        assert_eq!(padded.get(&yrs::ClientID::new(1)), 5);
    }

    /// A document touching every content kind yrs writes but subdocuments: strings (with
    /// characters outside the BMP), formats, embeds, nested Any values, binary, nested types,
    /// XML; then deletions (which become Deleted contents and GC structs).
    fn rich_updates() -> (Doc, Vec<Vec<u8>>) {
        let doc = crate::doc::new_doc(1 << 40).unwrap();
        let text = doc.get_or_insert_text("text");
        let map = doc.get_or_insert_map("map");
        let array = doc.get_or_insert_array("array");
        let xml = doc.get_or_insert_xml_fragment("xml");
        let mut updates = Vec::new();
        let mut record = |f: &dyn Fn(&mut yrs::TransactionMut<'_>)| {
            let mut txn = doc.transact_mut();
            f(&mut txn);
            updates.push(txn.encode_update_v1());
        };
        record(&|txn| text.insert(txn, 0, "héllo 🌍 world"));
        record(&|txn| {
            let bold: Attrs = Attrs::from([("bold".into(), Any::from(true))]);
            text.format(txn, 0, 5, bold.clone());
            text.insert_with_attributes(txn, 3, "BOLD", bold);
        });
        record(&|txn| {
            text.insert_embed(txn, 2, Any::from(vec![Any::from("image"), Any::from(2.5)]));
        });
        record(&|txn| {
            let nested = Any::from(std::collections::HashMap::from([
                (
                    "list".to_string(),
                    Any::from(vec![
                        Any::from(1),
                        Any::Null,
                        Any::Undefined,
                        Any::from(-7_000_000_000i64),
                    ]),
                ),
                ("bytes".to_string(), Any::from(vec![0u8, 1, 255])),
                (
                    "deep".to_string(),
                    Any::from(vec![Any::from(vec![Any::from(vec![Any::from("x")])])]),
                ),
                ("f".to_string(), Any::from(0.1f64)),
                ("big".to_string(), Any::Number(yrs::Number::Int(i64::MAX))),
            ]));
            map.insert(txn, "nested", nested);
            map.insert(txn, "n", 42);
            map.insert(txn, "inner", MapPrelim::from([("a", 1), ("b", 2)]));
            array.insert(txn, 0, ArrayPrelim::from([1, 2, 3]));
            array.insert_range(txn, 1, [Any::from("a"), Any::from(true), Any::from(false)]);
        });
        record(&|txn| {
            let p = xml.push_back(txn, XmlElementPrelim::empty("p"));
            p.insert_attribute(txn, "class", "lead");
            p.push_back(txn, XmlTextPrelim::new("para"));
            xml.push_back(txn, XmlTextPrelim::new("tail"));
        });
        record(&|txn| {
            text.remove_range(txn, 1, 6);
            map.remove(txn, "nested");
            map.insert(txn, "n", 43);
            array.remove_range(txn, 0, 2);
        });
        let _ = doc.transact().get_text("text").map(|t| t.get_string(&doc.transact()));
        (doc, updates)
    }

    #[test]
    fn every_content_kind_round_trips() {
        let (doc, updates) = rich_updates();
        let replica = crate::doc::new_doc(5).unwrap();
        for update in &updates {
            let summary = accepted(update);
            assert!(dependencies_satisfied(&summary, have(&replica)));
            crate::doc::apply_bytes(&replica, update).unwrap();
            assert!(!pending(&replica));
        }
        // The whole state after deletions: Deleted contents and GC structs.
        let state = crate::doc::encode_state(&doc);
        let summary = accepted(&state);
        assert!(summary.groups.len() == 1 && !summary.deletes.is_empty());
        assert!(state.contains(&GC), "no GC struct in {state:02x?}");
        // Diffs against partial state vectors start mid-client.
        let partial = Update::decode_v1(&updates[0]).unwrap().state_vector();
        let diff = doc.transact().encode_diff_v1(&partial);
        let summary = accepted(&diff);
        assert!(summary.groups[0].start > 0);
        assert!(!dependencies_satisfied(&summary, |_| 0));
        assert!(dependencies_satisfied(&summary, |_| summary.groups[0].start));
    }

    #[test]
    fn subdocuments_are_refused_but_their_grammar_is_known() {
        let doc = crate::doc::new_doc(1).unwrap();
        let map = doc.get_or_insert_map("map");
        let (_, update) = crate::doc::edit(&doc, |txn| {
            map.insert(txn, "sub", Doc::new());
        });
        let e = check_update(&update).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::SubdocContent);
        // The content itself (guid + options) walks as yrs reads it.
        let mut r = Reader::new(&update[e.offset() + 1..]);
        r.var_u32().unwrap(); // parent info
        r.string().unwrap(); // root name
        r.string().unwrap(); // parent sub
        assert_eq!(check_content(&mut r, 9), Ok(1));
        assert_eq!(r.remaining(), 1, "only the empty delete set is left");
    }

    #[test]
    fn merged_updates_with_holes_carry_skip_structs() {
        let (_, updates) = rich_updates();
        // Updates 0, 2 and 4 without 1 and 3: yrs fills the holes with Skip structs.
        let merged = Update::merge_updates([0, 2, 4].map(|i| Update::decode_v1(&updates[i]).unwrap())).encode_v1();
        let summary = accepted(&merged);
        assert!(merged.contains(&SKIP));
        assert_eq!(summary.groups.len(), 1);
        assert_eq!(summary.carried.len(), 3, "{summary:?}");
        let g = summary.groups[0];
        assert_eq!(g.start, 0);
        assert_eq!(g.end, summary.carried[2].2);
        // A document with only update 0 lacks the clocks of update 1 (a hole): not satisfied.
        let replica = crate::doc::new_doc(5).unwrap();
        crate::doc::apply_bytes(&replica, &updates[0]).unwrap();
        assert!(!dependencies_satisfied(&summary, have(&replica)));
        // With 0..=3 it has everything the update builds on.
        for u in &updates[1..4] {
            crate::doc::apply_bytes(&replica, u).unwrap();
        }
        assert!(dependencies_satisfied(&summary, have(&replica)));
        crate::doc::apply_bytes(&replica, &merged).unwrap();
        assert!(!pending(&replica));
    }

    #[test]
    fn cross_client_references_are_listed() {
        let a = crate::doc::new_doc(1).unwrap();
        let b = crate::doc::new_doc(2).unwrap();
        let ua = crate::doc::text_insert(&a, 0, "abc").unwrap();
        crate::doc::apply_bytes(&b, &ua).unwrap();
        let ub = crate::doc::text_insert(&b, 1, "X").unwrap();
        let summary = accepted(&ub);
        // "X" sits between a's "a" (clock 0) and "b" (clock 1).
        assert_eq!(summary.references, vec![(1, 0), (1, 1)]);
        let fresh = crate::doc::new_doc(3).unwrap();
        assert!(!dependencies_satisfied(&summary, have(&fresh)));
        crate::doc::apply_bytes(&fresh, &ub).unwrap();
        assert!(pending(&fresh), "yrs keeps it pending, as predicted");
        assert!(dependencies_satisfied(&summary, have(&a)));
        // The same references satisfied by the update itself.
        let both = Update::merge_updates([&ua, &ub].map(|u| Update::decode_v1(u).unwrap())).encode_v1();
        let summary = accepted(&both);
        assert!(dependencies_satisfied(&summary, |_| 0));
        // A map entry's parent is a root name; a nested type's children name it by ID.
        let nested = crate::doc::new_doc(4).unwrap();
        let map = nested.get_or_insert_map("m");
        crate::doc::apply_bytes(&nested, &ub).unwrap_or(());
        let (_, u1) = crate::doc::edit(&nested, |txn| {
            map.insert(txn, "inner", MapPrelim::default());
        });
        let inner = map
            .get(&nested.transact(), "inner")
            .unwrap()
            .cast::<yrs::MapRef>()
            .unwrap();
        let c = crate::doc::new_doc(9).unwrap();
        crate::doc::apply_bytes(&c, &u1).unwrap();
        let cmap = c.get_or_insert_map("m");
        let cinner = cmap.get(&c.transact(), "inner").unwrap().cast::<yrs::MapRef>().unwrap();
        let (_, u2) = crate::doc::edit(&c, |txn| {
            cinner.insert(txn, "k", "v");
        });
        let _ = inner;
        let summary = accepted(&u2);
        assert_eq!(summary.references, vec![(4, 0)]);
    }

    /// yrs 0.28 integrates a struct whose own client's earlier clocks are missing when its
    /// references are present, behind a Skip hole (its state vector stays below the hole), rather
    /// than keeping it pending. [`dependencies_satisfied`] is stricter: it requires every group
    /// to start where the document is, so a server never stores a document with holes.
    #[test]
    fn yrs_integrates_past_holes() {
        let a = crate::doc::new_doc(1).unwrap();
        let first = crate::doc::map_set(&a, "x", 1);
        let second = crate::doc::map_set(&a, "y", 2);
        let summary = accepted(&second);
        assert_eq!(summary.groups[0].start, 1);
        let fresh = crate::doc::new_doc(2).unwrap();
        assert!(!dependencies_satisfied(&summary, have(&fresh)));
        crate::doc::apply_bytes(&fresh, &second).unwrap();
        assert!(!pending(&fresh));
        // "y" is there, behind a Skip hole; the state vector stays at the hole.
        assert_eq!(crate::doc::map_get(&fresh, "y"), Some(Any::from(2)));
        assert_eq!(have(&fresh)(1), 0);
        let state = crate::doc::encode_state(&fresh);
        assert_eq!(accepted(&state).carried, vec![(1, 1, 2)]);
        // The hole is filled when the first update arrives.
        crate::doc::apply_bytes(&fresh, &first).unwrap();
        assert_eq!(crate::doc::map_get(&fresh, "x"), Some(Any::from(1)));
        assert_eq!(have(&fresh)(1), 2);
    }

    #[test]
    fn deep_any_values_are_bounded() {
        // Any content [[[ … null … ]]] nested `depth` containers deep, in a root "a".
        let update = |depth: usize| {
            let mut u = [v(1), v(1), v(1), v(0), vec![8, 1], s("a"), v(1)].concat();
            for _ in 0..depth {
                u.extend([117, 1]);
            }
            u.push(126);
            u.push(0);
            u
        };
        let ok = update(MAX_ANY_DEPTH);
        accepted(&ok);
        assert_eq!(refused(&update(MAX_ANY_DEPTH + 1)), ErrorKind::AnyTooDeep);
        // 2 MB of nesting: refused in a single pass, without recursion.
        let start = Instant::now();
        assert_eq!(refused(&update(1_000_000)), ErrorKind::AnyTooDeep);
        assert!(start.elapsed() < Duration::from_secs(1));
        // Maps nest too (a key before every value).
        let mut u = [v(1), v(1), v(1), v(0), vec![8, 1], s("a"), v(1)].concat();
        for _ in 0..=MAX_ANY_DEPTH {
            u.extend([118, 1, 0]);
        }
        u.extend([126, 0]);
        assert_eq!(refused(&u), ErrorKind::AnyTooDeep);
    }

    #[test]
    fn hostile_updates_are_refused() {
        let head = |structs: u64, client: u64, clock: u64| [v(1), v(structs), v(client), v(clock)].concat();
        // Parent info 1 and a root name.
        let root = [vec![1], s("a")].concat();
        // Clock overflow: a GC at u32::MAX of length 2; two GCs summing past u32; a start or an
        // end past MAX_CLOCK (yrs's i32 arithmetic).
        let max = u64::from(MAX_CLOCK);
        assert_eq!(
            refused(&[head(1, 1, u32::MAX as u64), vec![0], v(2), v(0)].concat()),
            ErrorKind::ClockOverflow
        );
        assert_eq!(
            refused(&[head(2, 1, 0), vec![0], v(u32::MAX as u64), vec![0], v(1), v(0)].concat()),
            ErrorKind::ClockOverflow
        );
        assert_eq!(refused(&[head(0, 1, max + 1), v(0)].concat()), ErrorKind::ClockOverflow);
        assert_eq!(
            refused(&[head(1, 1, max), vec![4], root.clone(), s("x"), v(0)].concat()),
            ErrorKind::ClockOverflow
        );
        // Up to MAX_CLOCK exactly is fine.
        accepted(&[head(1, 1, 1), vec![0], v(max - 1), v(0)].concat());
        accepted(&[head(1, 1, max - 1), vec![4], root.clone(), s("x"), v(0)].concat());
        // A delete-set range past u32.
        assert_eq!(
            refused(&[v(0), v(1), v(1), v(1), v(u32::MAX as u64), v(2)].concat()),
            ErrorKind::ClockOverflow
        );
        // Client ids of 2^53 in a group, an origin, a parent ID, the delete set.
        assert_eq!(
            refused(&[head(1, MAX_CLIENT_ID, 0), vec![0], v(1), v(0)].concat()),
            ErrorKind::ClientIdTooLarge
        );
        assert_eq!(
            refused(&[head(1, 1, 0), vec![0x84], v(MAX_CLIENT_ID), v(0), s("x"), v(0)].concat()),
            ErrorKind::ClientIdTooLarge
        );
        assert_eq!(
            refused(&[head(1, 1, 0), vec![0x04, 0], v(MAX_CLIENT_ID), v(0), s("x"), v(0)].concat()),
            ErrorKind::ClientIdTooLarge
        );
        assert_eq!(
            refused(&[v(0), v(1), v(MAX_CLIENT_ID), v(1), v(0), v(1)].concat()),
            ErrorKind::ClientIdTooLarge
        );
        // Trailing bytes; a missing delete set.
        assert_eq!(refused(&[0, 0, 0]), ErrorKind::TrailingBytes);
        assert_eq!(refused(&[0]), ErrorKind::UnexpectedEnd);
        accepted(&[0, 0]);
        // Counts the input cannot hold.
        assert_eq!(
            refused(&[head(1000, 1, 0), vec![0], v(1), v(0)].concat()),
            ErrorKind::CountTooLarge
        );
        assert_eq!(
            refused(&[v(0), v(1000), v(1), v(1), v(0), v(1)].concat()),
            ErrorKind::CountTooLarge
        );
        assert_eq!(
            refused(&[head(1, 1, 0), vec![4], root.clone(), v(1000), b"x".to_vec(), v(0)].concat()),
            ErrorKind::CountTooLarge
        );
        assert_eq!(
            refused(&[head(1, 1, 0), vec![8], root.clone(), v(1), vec![118], v(1 << 40), v(0)].concat()),
            ErrorKind::CountTooLarge
        );
        // ContentJSON: yrs reads count + 1 strings, writes count; refused.
        let json = [head(1, 1, 0), vec![2], root.clone(), v(1), s("1"), s("2"), v(0)].concat();
        assert_eq!(refused(&json), ErrorKind::JsonContent);
        let poisoned = Doc::new();
        poisoned
            .transact_mut()
            .apply_update(Update::decode_v1(&json).unwrap())
            .unwrap();
        let state = poisoned.transact().encode_state_as_update_v1(&StateVector::default());
        assert!(
            Update::decode_v1(&state).is_err(),
            "yrs 0.28 cannot decode its own encoding of it"
        );
        // Duplicate clients.
        let gc = |client: u64, clock: u64| [v(1), v(client), v(clock), vec![0], v(1)].concat();
        assert_eq!(
            refused(&[v(2), gc(1, 0), gc(1, 1), v(0)].concat()),
            ErrorKind::DuplicateClient
        );
        assert_eq!(
            refused(&[v(0), v(2), v(1), v(1), v(0), v(1), v(1), v(1), v(2), v(1)].concat()),
            ErrorKind::DuplicateClient
        );
        // An item referencing its own client's future.
        assert_eq!(
            refused(&[head(1, 1, 0), vec![0x84], v(1), v(0), s("x"), v(0)].concat()),
            ErrorKind::ForwardReference
        );
        // Unknown info bytes, type refs, Any tags, parent infos; empty GC/Skip; bad UTF-8.
        for info in [0x10, 0x14, 0x0b, 0x0f, 0x80, 0x8a] {
            assert_eq!(
                refused(&[head(1, 1, 0), vec![info], root.clone(), s("x"), v(0)].concat()),
                ErrorKind::UnknownStruct(info)
            );
        }
        assert_eq!(
            refused(&[head(1, 1, 0), vec![7], root.clone(), vec![7], v(0)].concat()),
            ErrorKind::UnknownTypeRef(7)
        );
        assert_eq!(
            refused(&[head(1, 1, 0), vec![8], root.clone(), v(1), vec![100], v(0)].concat()),
            ErrorKind::UnknownAnyTag(100)
        );
        assert_eq!(
            refused(&[head(1, 1, 0), vec![4, 2], s("a"), s("x"), v(0)].concat()),
            ErrorKind::UnknownParentInfo
        );
        assert_eq!(
            refused(&[head(1, 1, 0), vec![0], v(0), v(0)].concat()),
            ErrorKind::EmptyBlock
        );
        assert_eq!(
            refused(&[head(1, 1, 0), vec![10], v(0), v(0)].concat()),
            ErrorKind::EmptyBlock
        );
        assert_eq!(
            refused(&[head(1, 1, 0), vec![4], root.clone(), vec![1, 0xff], v(0)].concat()),
            ErrorKind::InvalidUtf8
        );
        // lib0 integers: 11 bytes (a shift by 69 bits in yrs) and -2^63 (negating i64::MIN).
        let any_int = |bytes: &[u8]| {
            [
                head(1, 1, 0),
                vec![8],
                root.clone(),
                v(1),
                vec![125],
                bytes.to_vec(),
                v(0),
            ]
            .concat()
        };
        accepted(&any_int(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00]));
        assert_eq!(refused(&any_int(&[0x80; 10])), ErrorKind::VarIntTooLong);
        assert_eq!(
            refused(&any_int(&[0xc0, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x02])),
            ErrorKind::IntegerTooLarge
        );
        // u32 fields of more than 32 bits (yrs wraps them silently).
        assert_eq!(
            refused(&[head(1, 1, 1 << 32), vec![0], v(1), v(0)].concat()),
            ErrorKind::IntegerTooLarge
        );
        assert_eq!(refused(&[0x80; 11]), ErrorKind::VarIntTooLong);
    }

    #[test]
    fn truncated_updates_never_panic_and_agree_with_yrs() {
        let (doc, updates) = rich_updates();
        let state = crate::doc::encode_state(&doc);
        for update in updates.iter().chain([&state]) {
            for len in 0..update.len() {
                let prefix = &update[..len];
                // The walk of a strict prefix follows the walk of the whole update until it needs
                // a byte past the end: always refused. yrs refuses it too, or reads a value the
                // checker would not accept (a count larger than the rest, say) — never a panic.
                assert!(check_update(prefix).is_err(), "{prefix:02x?}");
                let _ = std::panic::catch_unwind(|| Update::decode_v1(prefix)).expect("yrs panicked");
                crate::fuzz::update_apply(prefix);
            }
        }
    }

    /// A lib0 `Any` value of bounded depth.
    fn any_value() -> impl Strategy<Value = Any> {
        let leaf = prop_oneof![
            Just(Any::Null),
            Just(Any::Undefined),
            any::<bool>().prop_map(Any::from),
            any::<i32>().prop_map(|n| Any::from(n as i64)),
            any::<i64>().prop_map(|n| Any::Number(yrs::Number::Int(n))),
            any::<f64>()
                .prop_filter("NaN is not equal to itself", |f| !f.is_nan())
                .prop_map(Any::from),
            ".{0,8}".prop_map(Any::from),
            prop::collection::vec(any::<u8>(), 0..8).prop_map(Any::from),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Any::from),
                prop::collection::hash_map(".{0,4}", inner, 0..6).prop_map(Any::from),
            ]
        })
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(usize, u16, String),
        Delete(usize, u16, u16),
        Format(usize, u16, u16, bool),
        Embed(usize, u16, Any),
        MapSet(usize, u8, Any),
        MapRemove(usize, u8),
        ArrayInsert(usize, u16, Any),
        Nested(usize, u8),
        Sync(usize, usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        let r = 0..3usize;
        prop_oneof![
            4 => (r.clone(), any::<u16>(), "[a-zé🌍]{1,6}").prop_map(|(d, i, s)| Op::Insert(d, i, s)),
            2 => (r.clone(), any::<u16>(), 1..8u16).prop_map(|(d, i, n)| Op::Delete(d, i, n)),
            1 => (r.clone(), any::<u16>(), 1..8u16, any::<bool>()).prop_map(|(d, i, n, b)| Op::Format(d, i, n, b)),
            1 => (r.clone(), any::<u16>(), any_value()).prop_map(|(d, i, a)| Op::Embed(d, i, a)),
            2 => (r.clone(), 0..4u8, any_value()).prop_map(|(d, k, a)| Op::MapSet(d, k, a)),
            1 => (r.clone(), 0..4u8).prop_map(|(d, k)| Op::MapRemove(d, k)),
            2 => (r.clone(), any::<u16>(), any_value()).prop_map(|(d, i, a)| Op::ArrayInsert(d, i, a)),
            1 => (r.clone(), 0..4u8).prop_map(|(d, k)| Op::Nested(d, k)),
            2 => (r.clone(), r).prop_map(|(a, b)| Op::Sync(a, b)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Every update yrs produces from random edits on three replicas passes the checker, its
        /// summary matches yrs's own view, and `dependencies_satisfied` predicts exactly whether
        /// a fresh replica receiving it alone would keep something pending.
        #[test]
        fn updates_from_random_edits_pass(ops in prop::collection::vec(op(), 1..40)) {
            let clients = [1u64, 0x1234_5678, MAX_CLIENT_ID - 1];
            let docs: Vec<Doc> = clients.iter().map(|&c| crate::doc::new_doc(c).unwrap()).collect();
            let mut log: Vec<Vec<u8>> = Vec::new();
            for op in ops {
                let update = match op {
                    Op::Insert(d, i, s) => {
                        let t = docs[d].get_or_insert_text("text");
                        let len = t.len(&docs[d].transact());
                        crate::doc::edit(&docs[d], |txn| t.insert(txn, u32::from(i) % (len + 1), &s)).1
                    }
                    Op::Delete(d, _, _) | Op::Format(d, _, _, _) if crate::doc::text_len(&docs[d]) == 0 => {
                        vec![0, 0]
                    }
                    Op::Delete(d, i, n) => {
                        let t = docs[d].get_or_insert_text("text");
                        let len = t.len(&docs[d].transact());
                        let i = u32::from(i) % len;
                        let n = u32::from(n).min(len - i);
                        crate::doc::edit(&docs[d], |txn| t.remove_range(txn, i, n)).1
                    }
                    Op::Format(d, i, n, b) => {
                        let t = docs[d].get_or_insert_text("text");
                        let len = t.len(&docs[d].transact());
                        let i = u32::from(i) % len;
                        let n = u32::from(n).min(len - i);
                        let attrs = Attrs::from([("b".into(), if b { Any::from(true) } else { Any::Null })]);
                        crate::doc::edit(&docs[d], |txn| t.format(txn, i, n, attrs)).1
                    }
                    Op::Embed(d, i, a) => {
                        let t = docs[d].get_or_insert_text("text");
                        let len = t.len(&docs[d].transact());
                        crate::doc::edit(&docs[d], |txn| { t.insert_embed(txn, u32::from(i) % (len + 1), a); }).1
                    }
                    Op::MapSet(d, k, a) => crate::doc::map_set(&docs[d], &format!("k{k}"), a),
                    Op::MapRemove(d, k) => crate::doc::map_remove(&docs[d], &format!("k{k}")),
                    Op::ArrayInsert(d, i, a) => {
                        let arr = docs[d].get_or_insert_array("array");
                        let len = arr.len(&docs[d].transact());
                        crate::doc::edit(&docs[d], |txn| { arr.insert(txn, u32::from(i) % (len + 1), a); }).1
                    }
                    Op::Nested(d, k) => {
                        let map = docs[d].get_or_insert_map("map");
                        crate::doc::edit(&docs[d], |txn| {
                            let inner = map.insert(txn, format!("n{k}"), MapPrelim::default());
                            inner.insert(txn, "x", ArrayPrelim::from([1, 2]));
                        }).1
                    }
                    Op::Sync(a, b) => {
                        let sv = docs[b].transact().state_vector();
                        let diff = docs[a].transact().encode_diff_v1(&sv);
                        let summary = accepted(&diff);
                        prop_assert!(dependencies_satisfied(&summary, have(&docs[b])));
                        crate::doc::apply_bytes(&docs[b], &diff).unwrap();
                        prop_assert!(!pending(&docs[b]));
                        continue;
                    }
                };
                let summary = accepted(&update);
                // Alone on a fresh replica: never pending when the dependencies are satisfied,
                // never satisfied when yrs keeps something pending. (yrs also integrates a struct
                // whose own client's earlier clocks are missing, leaving a hole: see
                // `yrs_integrates_past_holes`.)
                let fresh = crate::doc::new_doc(99).unwrap();
                let satisfied = dependencies_satisfied(&summary, have(&fresh));
                crate::doc::apply_bytes(&fresh, &update).unwrap();
                prop_assert!(!(satisfied && pending(&fresh)), "{:?}", summary);
                log.push(update);
            }
            // Replaying the whole log in order never misses anything.
            let replay = crate::doc::new_doc(98).unwrap();
            for update in &log {
                let summary = accepted(update);
                prop_assert!(dependencies_satisfied(&summary, have(&replay)));
                crate::doc::apply_bytes(&replay, update).unwrap();
            }
            // Whole states, and merges of every other update (holes become Skip structs).
            for doc in &docs {
                accepted(&crate::doc::encode_state(doc));
            }
            let odd: Vec<Update> = log.iter().skip(1).step_by(2).map(|u| Update::decode_v1(u).unwrap()).collect();
            accepted(&Update::merge_updates(odd).encode_v1());
        }
    }
}
