//! Reading a `text/event-stream` response body cheaply, as the SSE clients
//! do by the thousand: HTTP/1.1 chunked transfer coding decoded in place in
//! the read buffer, then the event-stream line format (lines end with LF,
//! CRLF or CR; `:` starts a comment, pgrelay's heartbeat; `event:` names the
//! event; `data:` lines are joined by LF; a blank line dispatches), each
//! event's data handed out as a slice of that same buffer. No JSON is read
//! here: the data goes to [`crate::frame`] as a WebSocket text frame does.
//! `id:` and `retry:` are skipped: the client keeps its cursor from the
//! frames' ids, as over WebSocket.

/// The longest event (or line) the reader holds before giving up.
const MAX_PENDING: usize = 16 << 20;
/// Spare room kept in the buffer for each read.
const READ_ROOM: usize = 1024;

/// An event's `event:` name, as far as the bench cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Hello,
    Event,
    Reset,
    Close,
    /// Another name, or none (`message`).
    Other,
}

impl Kind {
    fn named(name: &[u8]) -> Kind {
        match name {
            b"hello" => Kind::Hello,
            b"event" => Kind::Event,
            b"reset" => Kind::Reset,
            b"close" => Kind::Close,
            _ => Kind::Other,
        }
    }
}

/// Where the chunked decoder stands (RFC 9112, section 7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunked {
    /// In a chunk-size line: the size so far and its hex digits.
    Size {
        size: u64,
        digits: u32,
    },
    /// In a chunk extension (after `;`), until the line ends.
    Extension {
        size: u64,
    },
    /// The size line's CR was read: its LF next.
    SizeLf {
        size: u64,
    },
    /// In a chunk's data: the bytes left.
    Data(u64),
    /// A chunk's data ended: CR LF next.
    DataCr,
    DataLf,
    /// After the last chunk: trailer lines, `blank` while the current one
    /// is empty so far; an empty one ends the body.
    Trailer {
        blank: bool,
    },
    Done,
}

impl Chunked {
    const START: Chunked = Chunked::Size { size: 0, digits: 0 };

    fn after_size(size: u64) -> Chunked {
        if size == 0 {
            Chunked::Trailer { blank: true }
        } else {
            Chunked::Data(size)
        }
    }

    /// Decodes `buf[out..]`, raw bytes, in place: chunk data moves down to
    /// `buf[out..]` (never up: framing only shrinks). Returns the end of the
    /// decoded bytes; a split anywhere is kept in the state.
    fn decode(&mut self, buf: &mut [u8], mut out: usize) -> Result<usize, &'static str> {
        let mut i = out;
        while i < buf.len() {
            if let Chunked::Data(left) = self {
                let take = (*left).min((buf.len() - i) as u64) as usize;
                if out != i {
                    buf.copy_within(i..i + take, out);
                }
                out += take;
                i += take;
                *left -= take as u64;
                if *left == 0 {
                    *self = Chunked::DataCr;
                }
                continue;
            }
            let b = buf[i];
            i += 1;
            *self = match (*self, b) {
                (Chunked::Size { size, digits }, _) if b.is_ascii_hexdigit() => {
                    if digits == 15 {
                        return Err("a chunk size over 15 hex digits");
                    }
                    let digit = u64::from((b as char).to_digit(16).unwrap_or(0));
                    Chunked::Size {
                        size: size << 4 | digit,
                        digits: digits + 1,
                    }
                }
                (Chunked::Size { size, digits: 1.. }, b';' | b' ' | b'\t') => {
                    Chunked::Extension { size }
                }
                (Chunked::Size { size, digits: 1.. } | Chunked::Extension { size }, b'\r') => {
                    Chunked::SizeLf { size }
                }
                (
                    Chunked::Size { size, digits: 1.. }
                    | Chunked::Extension { size }
                    | Chunked::SizeLf { size },
                    b'\n',
                ) => Chunked::after_size(size),
                (Chunked::Extension { .. }, _) => *self,
                (Chunked::DataCr, b'\r') => Chunked::DataLf,
                (Chunked::DataCr | Chunked::DataLf, b'\n') => Chunked::START,
                (Chunked::Trailer { blank: true }, b'\n') => Chunked::Done,
                (Chunked::Trailer { blank: false }, b'\n') => Chunked::Trailer { blank: true },
                (Chunked::Trailer { blank }, b'\r') => Chunked::Trailer { blank },
                (Chunked::Trailer { .. }, _) => Chunked::Trailer { blank: false },
                // Nothing follows the body on a `Connection: close` stream.
                (Chunked::Done, _) => return Ok(out),
                _ => return Err("a malformed chunked body"),
            };
        }
        Ok(out)
    }
}

/// Where an event's data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Data {
    None,
    /// One `data:` line: `buf[from..to]`.
    At(usize, usize),
    /// Several, joined in `joined`.
    Joined,
}

/// A response body being read as an event stream.
pub(crate) struct EventStream {
    /// `[..decoded]`: body bytes; `[decoded..]`: bytes read, not yet decoded.
    buf: Vec<u8>,
    decoded: usize,
    /// None: the body runs until the connection closes.
    chunked: Option<Chunked>,
    /// Where the next line starts.
    line: usize,
    /// The event being read.
    kind: Kind,
    data: Data,
    /// The last dispatched event's data.
    dispatched: Data,
    joined: Vec<u8>,
}

impl EventStream {
    /// A body read with `capacity` bytes of buffer, `chunked` or not, whose
    /// first bytes (read with the response head) are `first`.
    pub(crate) fn new(chunked: bool, first: &[u8], capacity: usize) -> Result<Self, &'static str> {
        let mut buf = Vec::with_capacity(capacity.max(first.len() + READ_ROOM));
        buf.extend_from_slice(first);
        let mut stream = EventStream {
            buf,
            decoded: 0,
            chunked: chunked.then_some(Chunked::START),
            line: 0,
            kind: Kind::Other,
            data: Data::None,
            dispatched: Data::None,
            joined: Vec::new(),
        };
        stream.decode()?;
        Ok(stream)
    }

    /// The buffer to read into: what the events handed out used is dropped
    /// first, and room made.
    pub(crate) fn read_buf(&mut self) -> Result<&mut Vec<u8>, &'static str> {
        let keep = match self.data {
            Data::At(from, _) => from,
            Data::None | Data::Joined => self.line,
        };
        if keep > 0 {
            self.buf.drain(..keep);
            self.decoded -= keep;
            self.line -= keep;
            if let Data::At(from, to) = self.data {
                self.data = Data::At(from - keep, to - keep);
            }
            self.dispatched = Data::None;
        }
        if self.buf.len() > MAX_PENDING {
            return Err("an event stream line or event over 16 MiB");
        }
        if self.buf.capacity() - self.buf.len() < READ_ROOM {
            self.buf.reserve(READ_ROOM.max(self.buf.len()));
        }
        Ok(&mut self.buf)
    }

    /// Decodes the bytes just read into [`Self::read_buf`].
    pub(crate) fn decode(&mut self) -> Result<(), &'static str> {
        match &mut self.chunked {
            None => self.decoded = self.buf.len(),
            Some(state) => {
                self.decoded = state.decode(&mut self.buf, self.decoded)?;
                self.buf.truncate(self.decoded);
            }
        }
        Ok(())
    }

    /// The chunked body has ended (its last chunk and trailer are read).
    pub(crate) fn ended(&self) -> bool {
        self.chunked == Some(Chunked::Done)
    }

    /// The next complete event's kind, its data in [`Self::data`]; `None`
    /// until more bytes are read.
    pub(crate) fn next_event(&mut self) -> Option<Kind> {
        loop {
            let rest = &self.buf[self.line..self.decoded];
            let at = rest.iter().position(|&b| b == b'\n' || b == b'\r')?;
            let end = self.line + at;
            let next = match (self.buf[end], rest.get(at + 1)) {
                (b'\r', Some(b'\n')) => end + 2,
                // A CR that ends what is decoded may be the first half of a CRLF.
                (b'\r', None) => return None,
                _ => end + 1,
            };
            let start = std::mem::replace(&mut self.line, next);
            if start == end {
                let kind = std::mem::replace(&mut self.kind, Kind::Other);
                self.dispatched = std::mem::replace(&mut self.data, Data::None);
                if self.dispatched != Data::None {
                    return Some(kind);
                }
                continue;
            }
            self.field(start, end);
        }
    }

    /// One non-blank line, `buf[start..end]`.
    fn field(&mut self, start: usize, end: usize) {
        let line = &self.buf[start..end];
        let (name, value) = match line.iter().position(|&b| b == b':') {
            // A comment (pgrelay's heartbeat).
            Some(0) => return,
            Some(colon) => {
                let skip = usize::from(line.get(colon + 1) == Some(&b' '));
                (&line[..colon], start + colon + 1 + skip)
            }
            None => (line, end),
        };
        match name {
            b"event" => self.kind = Kind::named(&self.buf[value..end]),
            b"data" => {
                self.data = match self.data {
                    Data::None => Data::At(value, end),
                    Data::At(from, to) => {
                        self.joined.clear();
                        self.joined.extend_from_slice(&self.buf[from..to]);
                        self.join(value, end)
                    }
                    Data::Joined => self.join(value, end),
                }
            }
            _ => {}
        }
    }

    fn join(&mut self, from: usize, to: usize) -> Data {
        self.joined.push(b'\n');
        self.joined.extend_from_slice(&self.buf[from..to]);
        Data::Joined
    }

    /// The data of the event [`Self::next_event`] returned last (until the
    /// next read).
    pub(crate) fn data(&self) -> &[u8] {
        match self.dispatched {
            Data::At(from, to) => &self.buf[from..to],
            Data::Joined => &self.joined,
            Data::None => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `raw` in pieces of `step` bytes; the events read, with names.
    fn events(chunked: bool, raw: &[u8], step: usize) -> Result<Vec<(Kind, String)>, &'static str> {
        let mut stream = EventStream::new(chunked, &raw[..step.min(raw.len())], 16)?;
        let mut out = Vec::new();
        let mut at = step.min(raw.len());
        loop {
            while let Some(kind) = stream.next_event() {
                out.push((kind, String::from_utf8_lossy(stream.data()).into_owned()));
            }
            if at >= raw.len() || stream.ended() {
                return Ok(out);
            }
            let to = (at + step).min(raw.len());
            stream.read_buf()?.extend_from_slice(&raw[at..to]);
            at = to;
            stream.decode()?;
        }
    }

    /// `body` as chunks of at most `size` bytes, with an extension on the
    /// first, then the last chunk and a trailer.
    fn chunk(body: &[u8], size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, piece) in body.chunks(size).enumerate() {
            let ext = if i == 0 { ";name=value" } else { "" };
            out.extend_from_slice(format!("{:X}{ext}\r\n", piece.len()).as_bytes());
            out.extend_from_slice(piece);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\nX-Trailer: 1\r\n\r\n");
        out
    }

    const STREAM: &[u8] =
        b"event: hello\ndata: {\"type\":\"hello\",\"last_id\":3,\"epoch\":\"e\"}\n\n\
        :\n\n\
        event: event\nid: e:4\ndata: {\"type\":\"event\",\"id\":4}\n\n\
        event:reset\r\ndata: {\"type\":\"reset\"}\r\n\r\n\
        event: close\rdata: {\"type\":\"close\",\"code\":4008}\r\r\
        data: a\ndata:\ndata: b\n\n\
        event: event\nid: e:5\n\n\
        data: {\"type\":\"event\",\"id\":6}\n\n";

    fn want() -> Vec<(Kind, String)> {
        vec![
            (
                Kind::Hello,
                r#"{"type":"hello","last_id":3,"epoch":"e"}"#.into(),
            ),
            (Kind::Event, r#"{"type":"event","id":4}"#.into()),
            (Kind::Reset, r#"{"type":"reset"}"#.into()),
            (Kind::Close, r#"{"type":"close","code":4008}"#.into()),
            (Kind::Other, "a\n\nb".into()),
            // The unnamed event after a data-less one: its name was reset.
            (Kind::Other, r#"{"type":"event","id":6}"#.into()),
        ]
    }

    #[test]
    fn lines_comments_and_multi_line_data_at_any_split() {
        for step in 1..=STREAM.len() {
            assert_eq!(events(false, STREAM, step), Ok(want()), "step {step}");
        }
    }

    #[test]
    fn chunked_bodies_at_any_split() {
        for size in [1, 7, 64, 4096] {
            let raw = chunk(STREAM, size);
            for step in [1, 2, 3, 5, 17, 100, raw.len()] {
                assert_eq!(
                    events(true, &raw, step),
                    Ok(want()),
                    "chunks of {size}, step {step}"
                );
            }
        }
    }

    #[test]
    fn the_last_chunk_ends_the_body() {
        let mut raw = chunk(b"data: x\n\n", 4);
        raw.extend_from_slice(b"whatever follows");
        let mut stream = EventStream::new(true, &raw, 0).expect("stream");
        assert_eq!(stream.next_event(), Some(Kind::Other));
        assert_eq!(stream.data(), b"x");
        assert!(stream.ended());
        assert!(!EventStream::new(true, b"5\r\nab", 0)
            .expect("stream")
            .ended());
    }

    #[test]
    fn malformed_chunks() {
        for raw in [
            &b"x\r\n"[..],
            b"\r\n",
            b"2\r\nabX",
            b"1234567890abcdef0\r\n",
        ] {
            assert!(EventStream::new(true, raw, 0).is_err(), "{raw:?}");
        }
    }

    #[test]
    fn an_incomplete_event_waits() {
        let mut stream =
            EventStream::new(false, b"event: event\ndata: {\"id\":1}\n", 0).expect("stream");
        assert_eq!(stream.next_event(), None);
        stream.read_buf().expect("room").extend_from_slice(b"\r");
        stream.decode().expect("decode");
        // A CR at the end may be half a CRLF.
        assert_eq!(stream.next_event(), None);
        stream.read_buf().expect("room").extend_from_slice(b"\n");
        stream.decode().expect("decode");
        assert_eq!(stream.next_event(), Some(Kind::Event));
        assert_eq!(stream.data(), br#"{"id":1}"#);
    }
}
