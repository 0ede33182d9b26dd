//! pg_dump custom-format archives, rewritten with their data in large pieces.
//!
//! `pg_dump -Fc -Z0` (the form pgkeep stores: uncompressed, so that dumps deduplicate) writes
//! each row of a table's data as its own length-prefixed piece, and pg_restore sends every
//! piece to the server as its own CopyData message. Restoring such an archive, the server's
//! COPY used about a tenth more CPU than from a compressed archive of the same data, whose
//! pieces pg_restore hands over as 4 KiB of decompressed text, and about a sixth more than
//! from the same archive merged (1.8M rows, `log_statement_stats`). [`Rechunker`] merges the
//! pieces of each data block into pieces of about [`TARGET_PIECE`] bytes on the way to
//! pg_restore. Where pieces split carries no meaning (pg_restore cuts the data of a
//! compressed archive at arbitrary places), so the archive restores exactly the same.
//!
//! Only data blocks change; the header and the table of contents pass through as they are.
//! The layout read, as PostgreSQL's pg_backup_archiver.c and pg_backup_custom.c write it:
//! - header: `PGDMP`, version (major, minor, revision bytes), int size, offset size, format
//!   (1 = custom), compression (an int before version 1.15, an algorithm byte since), the
//!   creation time (7 ints), then database name, server version and pg_dump version.
//! - table of contents: a count, then per entry: dump id and had-dumper (ints); table oid,
//!   oid, tag, description (strings); section (int); definition, drop statement, copy
//!   statement, namespace, tablespace (strings); table access method (string, 1.14+);
//!   relkind (int, 1.16+); owner and with-oids (strings); dependencies (strings up to a null
//!   one); the data offset (a flag byte and offset-size bytes).
//! - data: blocks, each a type byte (1 = table data, 3 = large objects) and a dump id. Table
//!   data is pieces (an int length and the bytes) up to a zero length; large objects are,
//!   per object, its oid and pieces up to a zero length, up to a zero oid.
//!
//! An int is a sign byte and int-size magnitude bytes, little-endian; a string is an int
//! length (negative: null) and its bytes.
//!
//! Anything unexpected (another format, version or compression, a block or field that does
//! not fit) makes the rest of the archive pass through unchanged, after the pieces merged so
//! far: the output always means what the input meant.

use std::collections::HashSet;
use std::io::{self, Write};

/// Merged pieces are cut once they reach this size (the server's COPY reads 64 KiB at once).
pub const TARGET_PIECE: usize = 64 << 10;

/// Archive versions (major, minor) whose table of contents is understood.
const VERSIONS: std::ops::RangeInclusive<(u8, u8)> = (1, 12)..=(1, 16);
const BLK_DATA: u8 = 1;
const BLK_BLOBS: u8 = 3;
/// A header and table of contents larger than this pass through unparsed.
const MAX_HEAD: usize = 256 << 20;
/// The largest piece length believed (PostgreSQL's own limit on a value is 1 GiB).
const MAX_PIECE: i64 = 1 << 31;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Collecting the header and table of contents.
    Head,
    /// Expecting a block's type byte.
    Block,
    /// Reading the dump id after a block type (`blobs`: large objects).
    BlockId { blobs: bool },
    /// Expecting a large object's oid, or 0 for the end of the block.
    Oid,
    /// Expecting a piece's length, or 0 for the end of the data (of the block or object).
    PieceLen { blobs: bool },
    /// Moving a piece's remaining `left` bytes into the merged piece.
    PieceData { left: usize, blobs: bool },
    /// Writing a piece larger than [`TARGET_PIECE`] straight through.
    PieceDirect { left: usize, blobs: bool },
    /// Everything passes through unchanged.
    Verbatim,
}

/// How many pieces went in and came out (see the module documentation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RechunkStats {
    /// Data pieces read.
    pub pieces_in: u64,
    /// Data pieces written.
    pub pieces_out: u64,
    /// Whether the archive was understood; false: it passed through unchanged from the
    /// point where it was not.
    pub understood: bool,
}

/// A writer that takes a custom-format archive and writes the same archive, its data in
/// pieces of about [`TARGET_PIECE`] bytes, to `out`. [`Rechunker::finish`] must be called
/// at the end: it writes what is still held.
pub struct Rechunker<W: Write> {
    out: W,
    state: State,
    /// The header and table of contents, until they are parsed.
    head: Vec<u8>,
    /// `head` is parsed again once it holds this many bytes: parsing on every write would
    /// cost quadratic time on a table of contents of millions of objects.
    parse_at: usize,
    /// The bytes of the field being read (a type byte or an int).
    field: Vec<u8>,
    merged: Vec<u8>,
    int_size: usize,
    /// Dump ids of the entries that have data.
    data_ids: HashSet<i64>,
    stats: RechunkStats,
}

impl<W: Write> Rechunker<W> {
    /// A rechunker writing to `out`.
    pub fn new(out: W) -> Self {
        Rechunker {
            out,
            state: State::Head,
            head: Vec::new(),
            parse_at: 0,
            field: Vec::new(),
            merged: Vec::with_capacity(TARGET_PIECE + (64 << 10)),
            int_size: 4,
            data_ids: HashSet::new(),
            stats: RechunkStats {
                understood: true,
                ..Default::default()
            },
        }
    }

    /// Writes what is still held (an archive cut short passes its last bytes as they came),
    /// flushes, and returns the writer with the counts.
    pub fn finish(mut self) -> io::Result<(W, RechunkStats)> {
        if self.state == State::Head && self.parse_at > 0 {
            // The last bytes may complete a head whose parse was put off.
            let head = std::mem::take(&mut self.head);
            self.parse_at = 0;
            self.feed(&head)?;
        }
        match self.state {
            State::Head => {
                self.out.write_all(&self.head)?;
                self.stats.understood = false;
            }
            State::Block => {}
            _ => {
                self.flush_merged()?;
                self.out.write_all(&self.field)?;
            }
        }
        self.out.flush()?;
        Ok((self.out, self.stats))
    }

    fn flush_merged(&mut self) -> io::Result<()> {
        if !self.merged.is_empty() {
            let len = encode_int(self.merged.len() as i64, self.int_size);
            self.out.write_all(&len)?;
            self.out.write_all(&self.merged)?;
            self.merged.clear();
            self.stats.pieces_out += 1;
        }
        Ok(())
    }

    /// From here on, bytes pass through: the merged piece and the partial field first.
    fn give_up(&mut self) -> io::Result<()> {
        self.flush_merged()?;
        let field = std::mem::take(&mut self.field);
        self.out.write_all(&field)?;
        self.state = State::Verbatim;
        self.stats.understood = false;
        Ok(())
    }

    /// Moves bytes of `buf` into the field until it holds `n`; true once it does.
    fn gather(&mut self, buf: &mut &[u8], n: usize) -> bool {
        let take = (n - self.field.len()).min(buf.len());
        self.field.extend_from_slice(&buf[..take]);
        *buf = &buf[take..];
        self.field.len() == n
    }

    /// Writes the complete field through and starts the next.
    fn pass_field(&mut self) -> io::Result<()> {
        self.out.write_all(&self.field)?;
        self.field.clear();
        Ok(())
    }

    fn feed(&mut self, mut buf: &[u8]) -> io::Result<()> {
        let int_len = self.int_size + 1;
        while !buf.is_empty() {
            match self.state {
                State::Head => {
                    self.head.extend_from_slice(buf);
                    buf = &[];
                    if self.head.len() < self.parse_at {
                        continue;
                    }
                    match parse_head(&self.head) {
                        Parsed::Need if self.head.len() <= MAX_HEAD => {
                            self.parse_at = self.head.len() * 2;
                        }
                        Parsed::Need | Parsed::Bad => {
                            self.out.write_all(&self.head)?;
                            self.head = Vec::new();
                            self.state = State::Verbatim;
                            self.stats.understood = false;
                        }
                        Parsed::Done {
                            end,
                            int_size,
                            data_ids,
                        } => {
                            self.out.write_all(&self.head[..end])?;
                            let rest = self.head.split_off(end);
                            self.head = Vec::new();
                            self.int_size = int_size;
                            self.data_ids = data_ids;
                            self.state = State::Block;
                            return self.feed(&rest);
                        }
                    }
                }
                State::Block => {
                    if self.gather(&mut buf, 1) {
                        match self.field[0] {
                            BLK_DATA | BLK_BLOBS => {
                                let blobs = self.field[0] == BLK_BLOBS;
                                self.pass_field()?;
                                self.state = State::BlockId { blobs };
                            }
                            _ => self.give_up()?,
                        }
                    }
                }
                State::BlockId { blobs } => {
                    if self.gather(&mut buf, int_len) {
                        match decode_int(&self.field) {
                            Some(id) if self.data_ids.contains(&id) => {
                                self.pass_field()?;
                                self.state = if blobs {
                                    State::Oid
                                } else {
                                    State::PieceLen { blobs: false }
                                };
                            }
                            _ => self.give_up()?,
                        }
                    }
                }
                State::Oid => {
                    if self.gather(&mut buf, int_len) {
                        match decode_int(&self.field) {
                            Some(0) => {
                                self.pass_field()?;
                                self.state = State::Block;
                            }
                            Some(oid) if oid > 0 => {
                                self.pass_field()?;
                                self.state = State::PieceLen { blobs: true };
                            }
                            _ => self.give_up()?,
                        }
                    }
                }
                State::PieceLen { blobs } => {
                    if self.gather(&mut buf, int_len) {
                        match decode_int(&self.field) {
                            Some(0) => {
                                self.flush_merged()?;
                                self.pass_field()?;
                                self.state = if blobs { State::Oid } else { State::Block };
                            }
                            Some(n) if n > 0 && n <= MAX_PIECE => {
                                self.stats.pieces_in += 1;
                                let left = n as usize;
                                if left > TARGET_PIECE {
                                    self.flush_merged()?;
                                    self.pass_field()?;
                                    self.stats.pieces_out += 1;
                                    self.state = State::PieceDirect { left, blobs };
                                } else {
                                    self.field.clear();
                                    self.state = State::PieceData { left, blobs };
                                }
                            }
                            _ => self.give_up()?,
                        }
                    }
                }
                State::PieceData { left, blobs } => {
                    let take = left.min(buf.len());
                    self.merged.extend_from_slice(&buf[..take]);
                    buf = &buf[take..];
                    if take == left {
                        if self.merged.len() >= TARGET_PIECE {
                            self.flush_merged()?;
                        }
                        self.state = State::PieceLen { blobs };
                    } else {
                        self.state = State::PieceData {
                            left: left - take,
                            blobs,
                        };
                    }
                }
                State::PieceDirect { left, blobs } => {
                    let take = left.min(buf.len());
                    self.out.write_all(&buf[..take])?;
                    buf = &buf[take..];
                    self.state = if take == left {
                        State::PieceLen { blobs }
                    } else {
                        State::PieceDirect {
                            left: left - take,
                            blobs,
                        }
                    };
                }
                State::Verbatim => {
                    self.out.write_all(buf)?;
                    buf = &[];
                }
            }
        }
        Ok(())
    }
}

impl<W: Write> Write for Rechunker<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.feed(buf)?;
        Ok(buf.len())
    }

    /// Flushes the output; a merged piece is held until it is complete.
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// An archive int: a sign byte and `int_size` magnitude bytes, little-endian.
fn encode_int(v: i64, int_size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(int_size + 1);
    out.push(u8::from(v < 0));
    let m = v.unsigned_abs();
    out.extend((0..int_size).map(|i| if i < 8 { (m >> (8 * i)) as u8 } else { 0 }));
    out
}

/// The value of an archive int (sign byte first); `None` when it does not fit an i64 or
/// its sign byte is neither 0 nor 1.
fn decode_int(b: &[u8]) -> Option<i64> {
    let (&sign, mag) = b.split_first()?;
    let mut v: u64 = 0;
    for (i, &x) in mag.iter().enumerate() {
        if x != 0 {
            if i >= 8 {
                return None;
            }
            v |= (x as u64) << (8 * i);
        }
    }
    let v = i64::try_from(v).ok()?;
    match sign {
        0 => Some(v),
        1 => Some(-v),
        _ => None,
    }
}

enum Parsed {
    /// More bytes are needed.
    Need,
    /// Not an archive this module understands.
    Bad,
    /// The header and table of contents end at `end`.
    Done {
        end: usize,
        int_size: usize,
        data_ids: HashSet<i64>,
    },
}

struct HeadReader<'a> {
    b: &'a [u8],
    pos: usize,
    int_size: usize,
}

/// Why reading stopped: the bytes ran out, or they are not what was expected.
enum Stop {
    Need,
    Bad,
}

impl HeadReader<'_> {
    fn bytes(&mut self, n: usize) -> Result<&[u8], Stop> {
        let s = self.b.get(self.pos..self.pos + n).ok_or(Stop::Need)?;
        self.pos += n;
        Ok(s)
    }

    fn byte(&mut self) -> Result<u8, Stop> {
        Ok(self.bytes(1)?[0])
    }

    fn int(&mut self) -> Result<i64, Stop> {
        let n = self.int_size + 1;
        decode_int(self.bytes(n)?).ok_or(Stop::Bad)
    }

    /// A string: Some(bytes), or None for a null one.
    fn string(&mut self) -> Result<Option<&[u8]>, Stop> {
        let n = self.int()?;
        if n < 0 {
            return Ok(None);
        }
        if n > MAX_HEAD as i64 {
            return Err(Stop::Bad);
        }
        self.bytes(n as usize).map(Some)
    }
}

fn parse_head(b: &[u8]) -> Parsed {
    let mut data_ids = HashSet::new();
    let mut r = HeadReader {
        b,
        pos: 0,
        int_size: 4,
    };
    let res = (|| -> Result<(), Stop> {
        if r.bytes(5)? != b"PGDMP" {
            return Err(Stop::Bad);
        }
        let (major, minor, _rev) = (r.byte()?, r.byte()?, r.byte()?);
        if !VERSIONS.contains(&(major, minor)) {
            return Err(Stop::Bad);
        }
        r.int_size = r.byte()? as usize;
        let off_size = r.byte()? as usize;
        if !(1..=8).contains(&r.int_size) || !(1..=8).contains(&off_size) {
            return Err(Stop::Bad);
        }
        if r.byte()? != 1 {
            return Err(Stop::Bad); // not the custom format
        }
        let compressed = if minor >= 15 {
            r.byte()? != 0
        } else {
            r.int()? != 0
        };
        if compressed {
            return Err(Stop::Bad);
        }
        for _ in 0..7 {
            r.int()?; // creation time
        }
        for _ in 0..3 {
            r.string()?; // database, server version, pg_dump version
        }
        let count = r.int()?;
        if !(0..=100_000_000).contains(&count) {
            return Err(Stop::Bad);
        }
        for _ in 0..count {
            let id = r.int()?;
            if id <= 0 {
                return Err(Stop::Bad);
            }
            if r.int()? != 0 {
                data_ids.insert(id);
            }
            for _ in 0..4 {
                r.string()?; // table oid, oid, tag, description
            }
            r.int()?; // section
            for _ in 0..5 {
                r.string()?; // definition, drop, copy, namespace, tablespace
            }
            if minor >= 14 {
                r.string()?; // table access method
            }
            if minor >= 16 {
                r.int()?; // relkind
            }
            r.string()?; // owner
            r.string()?; // with oids
            while r.string()?.is_some() {} // dependencies
            r.bytes(1 + off_size)?; // data offset
        }
        Ok(())
    })();
    match res {
        Ok(()) => Parsed::Done {
            end: r.pos,
            int_size: r.int_size,
            data_ids,
        },
        Err(Stop::Need) => Parsed::Need,
        Err(Stop::Bad) => Parsed::Bad,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ints_round_trip_in_the_archive_encoding() {
        for v in [0i64, 1, 255, 256, 65_536, 1 << 30, -1, -77] {
            assert_eq!(decode_int(&encode_int(v, 4)), Some(v));
        }
        assert_eq!(encode_int(300, 4), vec![0, 44, 1, 0, 0]);
        assert_eq!(decode_int(&[2, 1, 0, 0, 0]), None);
    }

    #[test]
    fn something_that_is_not_an_archive_passes_through_unchanged() {
        for input in [
            b"not an archive at all, just some bytes".to_vec(),
            b"PGDMP\x01\x63\x00".to_vec(), // version 1.99
            Vec::new(),
        ] {
            let mut r = Rechunker::new(Vec::new());
            for part in input.chunks(7) {
                r.write_all(part).unwrap();
            }
            let (out, stats) = r.finish().unwrap();
            assert_eq!(out, input);
            assert!(!stats.understood);
        }
    }
}
