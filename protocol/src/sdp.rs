//! SDP (RFC 8866 syntax) for IM calls: the strict parser, the rules for the single `message`
//! media (RFC 4975 `accept-types` / `max-size`, RFC 3428-style `sip null`), and the builders for
//! offers and answers.
//!
//! Everything that decides whether a call's SDP is acceptable, and which content types a call
//! may carry afterwards, lives here so that the node and the client agree byte for byte.
//!
//! The parser is deliberately strict: SDP arrives from untrusted peers, and a description we
//! only half understand is worse than a clean rejection. Any input yields `Ok` or `Err`; it
//! never panics.

use thiserror::Error;

/// Content type assumed when an `m=message` line carries no `a=accept-types`.
pub const DEFAULT_ACCEPT_TYPE: &str = "text/plain";

/// Bounds work per description; a legitimate IM offer is a dozen lines.
const MAX_LINES: usize = 1024;
/// Bounds the size of the answer, which echoes every offered media section.
const MAX_MEDIA: usize = 64;

/// The media is carried over confab's own connection, so the port in what we build is a
/// placeholder; it only has to be non-zero because zero means "stream rejected".
const PLACEHOLDER_PORT: u16 = 5060;

/// Session-level lines shared by offers and answers we build. The addresses are placeholders
/// for the same reason as [`PLACEHOLDER_PORT`].
const SESSION_HEADER: &str =
    "v=0\r\no=- 0 0 IN IP4 0.0.0.0\r\ns=-\r\nc=IN IP4 0.0.0.0\r\nt=0 0\r\n";

const ATTR_ACCEPT_TYPES: &str = "accept-types";
const ATTR_MAX_SIZE: &str = "max-size";

/// One `m=` section with the attributes that followed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Media {
    pub media: String,
    pub port: u16,
    pub proto: String,
    pub formats: Vec<String>,
    /// `a=name:value` as `(name, Some(value))`, flag `a=name` as `(name, None)`, in order.
    pub attributes: Vec<(String, Option<String>)>,
}

/// The parts of a description that confab uses. Session-level attributes and the other
/// informational lines are validated but not kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionDescription {
    pub version: u32,
    pub origin: String,
    pub session_name: String,
    /// Session-level `c=` only.
    pub connection: Option<String>,
    pub media: Vec<Media>,
}

/// What one side declared on its usable `m=message` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageMedia {
    /// As written (parameters included); `[DEFAULT_ACCEPT_TYPE]` when the line had none.
    pub accept_types: Vec<String>,
    pub max_size: Option<u64>,
}

/// The outcome of an offer/answer exchange: what the call may carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The answer's accept-types; each is within the offer's.
    pub accept_types: Vec<String>,
    /// The smaller of the two sides' limits when both gave one, else whichever was given.
    pub max_size: Option<u64>,
}

impl Negotiated {
    /// Whether a message of `content_type` may be sent on the call.
    pub fn allows(&self, content_type: &str) -> bool {
        content_type_allowed(&self.accept_types, content_type)
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SdpError {
    /// `line` is 1-based; 0 means the problem is not tied to one line (empty input, a required
    /// line missing at the end, or a hand-built description).
    #[error("malformed SDP at line {line}: {reason}")]
    Malformed { line: usize, reason: &'static str },
    #[error("no acceptable m=message line")]
    NoMessageMedia,
    #[error("answer accept-types are not a subset of the offer's")]
    NotSubset,
    #[error("no content type in common with the offer")]
    NoCommonType,
}

impl SdpError {
    /// Whether the right reply is "not acceptable" (SIP 488) rather than "bad request": the
    /// description was well-formed but offers nothing we can take. An offer whose content
    /// types are all unsupported is the same situation one level down, so it counts too.
    pub fn is_not_acceptable(&self) -> bool {
        matches!(self, Self::NoMessageMedia | Self::NoCommonType)
    }
}

fn malformed(line: usize, reason: &'static str) -> SdpError {
    SdpError::Malformed { line, reason }
}

/// Parses a description strictly. Lines end in CRLF or LF; one trailing line break is fine.
pub fn parse(text: &str) -> Result<SessionDescription, SdpError> {
    parse_borrowed(text).map(Parsed::into_owned)
}

/// [`parse`], its fields borrowed from `text`: the node reads an offer and an answer for every
/// call and keeps only their message media, so copying every field was most of a parse's
/// work (a dozen allocations for a dozen lines).
fn parse_borrowed(text: &str) -> Result<Parsed<'_>, SdpError> {
    let mut parser = Parser::default();
    let mut last_line = 0;
    for (index, raw) in lines(text).enumerate() {
        let number = index + 1;
        // Checked before the line is looked at so that a huge input costs at most MAX_LINES
        // lines of work.
        if number > MAX_LINES {
            return Err(malformed(number, "too many lines"));
        }
        parser.line(number, strip_line_break(raw))?;
        last_line = number;
    }
    parser.finish(last_line)
}

/// `text.split_inclusive('\n')`, by bytes: for lines this short, the char searcher's set-up
/// cost more than the search.
fn lines(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = rest
            .bytes()
            .position(|b| b == b'\n')
            .map_or(rest.len(), |i| i + 1);
        // A LF is one byte and never inside a multi-byte character: `end` is a boundary.
        let (line, tail) = rest.split_at(end);
        rest = tail;
        Some(line)
    })
}

/// Only a CR directly before the LF is part of the line break; a CR anywhere else (including
/// at the very end of unterminated input) stays in the line and is rejected as a control
/// character, because CR-only line endings are not SDP.
fn strip_line_break(raw: &str) -> &str {
    match raw.strip_suffix('\n') {
        Some(line) => line.strip_suffix('\r').unwrap_or(line),
        None => raw,
    }
}

impl SessionDescription {
    /// The first `m=message` line that is not rejected (port 0) and uses a transport we speak.
    pub fn message_media(&self) -> Result<MessageMedia, SdpError> {
        self.message_media_at().map(|(_, media)| media)
    }

    /// Also returns the section's index, which the answer needs to keep m-lines aligned.
    fn message_media_at(&self) -> Result<(usize, MessageMedia), SdpError> {
        let (index, media) = self
            .media
            .iter()
            .enumerate()
            .find(|(_, media)| is_usable_message(&media.media, media.port, &media.proto))
            .ok_or(SdpError::NoMessageMedia)?;
        // Re-validated rather than trusting the parser, because the fields are public and a
        // description may have been built by hand.
        let declared = message_attributes(
            media
                .attributes
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_deref())),
        )
        .map_err(|reason| malformed(0, reason))?;
        Ok((index, declared))
    }
}

fn is_message(media: &str) -> bool {
    media.eq_ignore_ascii_case("message")
}

fn is_usable_message(media: &str, port: u16, proto: &str) -> bool {
    is_message(media) && port != 0 && is_allowed_proto(proto)
}

/// What a message media section declares in its `a=accept-types` and `a=max-size`.
fn message_attributes<'a>(
    attributes: impl Iterator<Item = (&'a str, Option<&'a str>)>,
) -> Result<MessageMedia, &'static str> {
    let mut accept_types = None;
    let mut max_size = None;
    for (name, value) in attributes {
        if name.eq_ignore_ascii_case(ATTR_ACCEPT_TYPES) {
            if accept_types.is_some() {
                return Err("duplicate a=accept-types");
            }
            accept_types = Some(accept_types_value(value)?);
        } else if name.eq_ignore_ascii_case(ATTR_MAX_SIZE) {
            if max_size.is_some() {
                return Err("duplicate a=max-size");
            }
            max_size = Some(max_size_value(value)?);
        }
    }
    Ok(MessageMedia {
        accept_types: accept_types.unwrap_or_else(|| vec![DEFAULT_ACCEPT_TYPE.to_owned()]),
        max_size,
    })
}

fn is_allowed_proto(proto: &str) -> bool {
    ["sip", "TCP/MSRP", "TCP/TLS/MSRP"]
        .iter()
        .any(|allowed| proto.eq_ignore_ascii_case(allowed))
}

/// Parses `offer` and returns its usable message media.
pub fn offer_media(offer: &str) -> Result<MessageMedia, SdpError> {
    parse_borrowed(offer)?.message_media()
}

/// A minimal offer for one `m=message … sip null` stream. Entries of `accept_types` that are
/// not valid content types are left out (which also keeps anything with a line break from
/// reaching the output); when none remain the line says [`DEFAULT_ACCEPT_TYPE`] explicitly.
pub fn build_offer(accept_types: &[&str], max_size: Option<u64>) -> String {
    let mut valid: Vec<&str> = accept_types
        .iter()
        .copied()
        .filter(|t| parse_range(t).is_some())
        .collect();
    if valid.is_empty() {
        valid.push(DEFAULT_ACCEPT_TYPE);
    }
    let mut out = String::from(SESSION_HEADER);
    out.push_str(&format!("m=message {PLACEHOLDER_PORT} sip null\r\n"));
    push_message_attributes(&mut out, &valid, max_size);
    out
}

/// An answer to `offer` accepting the content types both sides can handle. `max_size` is our
/// own receive limit; [`negotiate`] combines it with the offer's.
///
/// Every offered m-line is echoed in order, with the ones we do not take set to port 0, as
/// RFC 3264 requires of an answer. The accepted line keeps the offer's transport and formats.
pub fn build_answer(
    offer: &str,
    supported: &[&str],
    max_size: Option<u64>,
) -> Result<String, SdpError> {
    let description = parse(offer)?;
    let (chosen, offered) = description.message_media_at()?;
    let common = intersect(&offered.accept_types, supported);
    if common.is_empty() {
        return Err(SdpError::NoCommonType);
    }
    let mut out = String::from(SESSION_HEADER);
    for (index, media) in description.media.iter().enumerate() {
        let port = if index == chosen { PLACEHOLDER_PORT } else { 0 };
        // Safe to echo: the parser only admits tokens in these fields.
        out.push_str(&format!(
            "m={} {} {} {}\r\n",
            media.media,
            port,
            media.proto,
            media.formats.join(" ")
        ));
        if index == chosen {
            push_message_attributes(&mut out, &common, max_size);
        }
    }
    Ok(out)
}

fn push_message_attributes(out: &mut String, accept_types: &[&str], max_size: Option<u64>) {
    out.push_str(&format!(
        "a={ATTR_ACCEPT_TYPES}:{}\r\n",
        accept_types.join(" ")
    ));
    if let Some(size) = max_size {
        out.push_str(&format!("a={ATTR_MAX_SIZE}:{size}\r\n"));
    }
}

/// Pairwise intersection of two lists of media ranges. Ranges are nested (a `*` contains a
/// `type/*` contains a `type/subtype`), so two ranges either do not overlap or one contains
/// the other, and the intersection is the narrower one, written as that side wrote it. The
/// offer's order is kept because it expresses the offerer's preference.
fn intersect<'a>(offered: &'a [String], supported: &[&'a str]) -> Vec<&'a str> {
    let mut picked: Vec<(&'a str, Range<'a>)> = Vec::new();
    for ours in offered {
        let Some(offered_range) = parse_range(ours) else {
            continue;
        };
        for &theirs in supported {
            let Some(supported_range) = parse_range(theirs) else {
                continue;
            };
            let narrower = if offered_range.covers(supported_range) {
                (theirs, supported_range)
            } else if supported_range.covers(offered_range) {
                (ours.as_str(), offered_range)
            } else {
                continue;
            };
            // Skipping what is already covered keeps `*` × `text/plain text/*` from listing
            // redundant entries twice.
            if !picked.iter().any(|(_, range)| range.covers(narrower.1)) {
                picked.push(narrower);
            }
        }
    }
    picked.into_iter().map(|(text, _)| text).collect()
}

/// Checks an answer against its offer and returns what the call may carry.
pub fn negotiate(offer: &str, answer: &str) -> Result<Negotiated, SdpError> {
    negotiate_offered(&offer_media(offer)?, answer)
}

/// [`negotiate`] with the offer's message media already parsed (by [`offer_media`]).
pub fn negotiate_offered(offered: &MessageMedia, answer: &str) -> Result<Negotiated, SdpError> {
    let answered = parse_borrowed(answer)?.message_media()?;
    let offered_ranges: Vec<Range<'_>> = offered
        .accept_types
        .iter()
        .filter_map(|t| parse_range(t))
        .collect();
    for accept_type in &answered.accept_types {
        let range = parse_range(accept_type).ok_or(malformed(0, "invalid content type"))?;
        if !offered_ranges.iter().any(|offered| offered.covers(range)) {
            return Err(SdpError::NotSubset);
        }
    }
    let max_size = match (offered.max_size, answered.max_size) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    Ok(Negotiated {
        accept_types: answered.accept_types,
        max_size,
    })
}

/// Whether a message whose Content-Type is `content_type` fits one of the `negotiated` types.
/// Parameters (`; charset=…`) are ignored. A wildcard is not a content type a message can
/// have, so it is never allowed.
pub fn content_type_allowed(negotiated: &[String], content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or(content_type)
        .trim();
    let Some(concrete @ Range::Exact(..)) = parse_range(essence) else {
        return false;
    };
    negotiated
        .iter()
        .filter_map(|t| parse_range(t))
        .any(|range| range.covers(concrete))
}

/// A content type as used in accept-types: possibly a wildcard, parameters dropped.
#[derive(Debug, Clone, Copy)]
enum Range<'a> {
    Any,
    Type(&'a str),
    Exact(&'a str, &'a str),
}

impl Range<'_> {
    /// Whether every content type matched by `other` is also matched by `self`.
    fn covers(self, other: Range<'_>) -> bool {
        match (self, other) {
            (Range::Any, _) => true,
            (_, Range::Any) => false,
            (Range::Type(a), Range::Type(b) | Range::Exact(b, _)) => a.eq_ignore_ascii_case(b),
            (Range::Exact(..), Range::Type(_)) => false,
            (Range::Exact(a, x), Range::Exact(b, y)) => {
                a.eq_ignore_ascii_case(b) && x.eq_ignore_ascii_case(y)
            }
        }
    }
}

/// `*`, `*/*`, `type/*` or `type/subtype`, each optionally followed by `;params`. Parameters
/// must be visible ASCII because the value sits inside a space-separated SDP attribute.
fn parse_range(text: &str) -> Option<Range<'_>> {
    let essence = match text.split_once(';') {
        Some((essence, params)) => {
            if params.is_empty() || !params.bytes().all(|b| b.is_ascii_graphic()) {
                return None;
            }
            essence
        }
        None => text,
    };
    if essence == "*" {
        return Some(Range::Any);
    }
    match essence.split_once('/')? {
        ("*", "*") => Some(Range::Any),
        ("*", _) => None,
        (ty, "*") if is_media_name(ty) => Some(Range::Type(ty)),
        (ty, sub) if is_media_name(ty) && is_media_name(sub) => Some(Range::Exact(ty, sub)),
        _ => None,
    }
}

/// RFC 6838 `restricted-name`.
fn is_media_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    let Some(first) = bytes.next() else {
        return false;
    };
    name.len() <= 127
        && first.is_ascii_alphanumeric()
        && bytes.all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
}

/// RFC 8866 `token`.
fn is_token(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`{|}~".contains(&b))
}

/// Splits on single spaces; `None` if any field is empty (double, leading or trailing space).
/// (The parser counts with [`field_count`]; this is its reference in the tests.)
#[cfg(test)]
fn fields(value: &str) -> Option<Vec<&str>> {
    let fields: Vec<&str> = value.split(' ').collect();
    fields
        .iter()
        .all(|f| !f.is_empty() && !f.contains('\t'))
        .then_some(fields)
}

/// How many fields [`fields`] would find, without collecting them. One pass over the bytes:
/// with `split` and `contains` this was a tenth of a call's SDP work.
fn field_count(value: &str) -> Option<usize> {
    let mut n = 0;
    // True at the start and after each space: a space or the end there means an empty field.
    let mut field_empty = true;
    for b in value.bytes() {
        match b {
            b'\t' => return None,
            b' ' if field_empty => return None,
            b' ' => {
                n += 1;
                field_empty = true;
            }
            _ => field_empty = false,
        }
    }
    (!field_empty).then_some(n + 1)
}

/// Only ASCII digits: `str::parse` would also take a leading `+`.
fn parse_digits<T: std::str::FromStr>(text: &str) -> Option<T> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn accept_types_value(value: Option<&str>) -> Result<Vec<String>, &'static str> {
    let value = check_accept_types(value)?;
    Ok(value.split(' ').map(str::to_owned).collect())
}

/// Validates an `a=accept-types` value (what [`accept_types_value`] would accept) and returns
/// it, without building the list: the parser checks every such line, but only the usable
/// message media's list is ever kept.
fn check_accept_types(value: Option<&str>) -> Result<&str, &'static str> {
    let value = value.ok_or("a=accept-types needs a value")?;
    field_count(value).ok_or("a=accept-types must be single-space separated")?;
    if value.split(' ').any(|t| parse_range(t).is_none()) {
        return Err("invalid content type in a=accept-types");
    }
    Ok(value)
}

fn max_size_value(value: Option<&str>) -> Result<u64, &'static str> {
    value
        .and_then(parse_digits)
        .ok_or("a=max-size must be a decimal u64")
}

/// A parsed description whose fields borrow the text (see [`parse_borrowed`]).
struct Parsed<'a> {
    origin: &'a str,
    session_name: &'a str,
    connection: Option<&'a str>,
    media: Vec<MediaRef<'a>>,
}

/// One `m=` section as [`Parsed`] holds it.
struct MediaRef<'a> {
    media: &'a str,
    port: u16,
    proto: &'a str,
    /// The formats as the line wrote them: single-space separated tokens (checked).
    formats: &'a str,
    attributes: Vec<(&'a str, Option<&'a str>)>,
}

impl Parsed<'_> {
    fn into_owned(self) -> SessionDescription {
        SessionDescription {
            version: 0,
            origin: self.origin.to_owned(),
            session_name: self.session_name.to_owned(),
            connection: self.connection.map(str::to_owned),
            media: self
                .media
                .into_iter()
                .map(|m| Media {
                    media: m.media.to_owned(),
                    port: m.port,
                    proto: m.proto.to_owned(),
                    formats: m.formats.split(' ').map(str::to_owned).collect(),
                    attributes: m
                        .attributes
                        .into_iter()
                        .map(|(name, value)| (name.to_owned(), value.map(str::to_owned)))
                        .collect(),
                })
                .collect(),
        }
    }

    /// [`SessionDescription::message_media`], on the borrowed fields (the parser checked them).
    fn message_media(&self) -> Result<MessageMedia, SdpError> {
        let media = self
            .media
            .iter()
            .find(|media| is_usable_message(media.media, media.port, media.proto))
            .ok_or(SdpError::NoMessageMedia)?;
        message_attributes(media.attributes.iter().copied()).map_err(|reason| malformed(0, reason))
    }
}

#[derive(Default)]
struct Parser<'a> {
    origin: Option<&'a str>,
    session_name: Option<&'a str>,
    connection: Option<&'a str>,
    media: Vec<MediaRef<'a>>,
}

impl<'a> Parser<'a> {
    fn line(&mut self, number: usize, line: &'a str) -> Result<(), SdpError> {
        let bad = |reason| malformed(number, reason);
        // For ASCII (every line of a real offer) the byte test is the same as the char test.
        let control = if line.is_ascii() {
            line.bytes().any(|b| b.is_ascii_control() && b != b'\t')
        } else {
            line.chars().any(|c| c.is_control() && c != '\t')
        };
        if control {
            return Err(bad("control character"));
        }
        let mut chars = line.chars();
        let (letter, value) = match (chars.next(), chars.next()) {
            (None, _) => return Err(bad("empty line")),
            (Some(letter), Some('=')) if letter.is_ascii_lowercase() => (letter, chars.as_str()),
            _ => return Err(bad("expected <lowercase letter>=<value>")),
        };
        if number == 1 {
            return if letter == 'v' && value == "0" {
                Ok(())
            } else {
                Err(bad("first line must be v=0"))
            };
        }
        if value.is_empty() {
            return Err(bad("empty value"));
        }
        let in_media = !self.media.is_empty();
        match letter {
            'v' => Err(bad("duplicate v= line")),
            // RFC 8866 allows these only at session level; seeing one after an m= means the
            // sender's idea of the structure differs from ours.
            'o' | 's' | 'u' | 'e' | 'p' | 't' | 'r' | 'z' if in_media => {
                Err(bad("session-level line inside a media section"))
            }
            'o' => {
                if self.origin.is_some() {
                    return Err(bad("duplicate o= line"));
                }
                if field_count(value) != Some(6) {
                    return Err(bad("o= needs six space-separated fields"));
                }
                self.origin = Some(value);
                Ok(())
            }
            's' => {
                if self.session_name.is_some() {
                    return Err(bad("duplicate s= line"));
                }
                self.session_name = Some(value);
                Ok(())
            }
            'c' => {
                if field_count(value) != Some(3) {
                    return Err(bad("c= needs three space-separated fields"));
                }
                if !in_media {
                    if self.connection.is_some() {
                        return Err(bad("duplicate session-level c= line"));
                    }
                    self.connection = Some(value);
                }
                Ok(())
            }
            // Two fields of digits only: no empty field, tab or third field can slip through.
            't' => match value.split_once(' ') {
                Some((start, stop))
                    if parse_digits::<u64>(start).is_some()
                        && parse_digits::<u64>(stop).is_some() =>
                {
                    Ok(())
                }
                _ => Err(bad("t= needs two decimal times")),
            },
            'b' => match value.split_once(':') {
                Some((kind, bandwidth))
                    if is_token(kind) && parse_digits::<u64>(bandwidth).is_some() =>
                {
                    Ok(())
                }
                _ => Err(bad("b= must be <type>:<bandwidth>")),
            },
            'i' | 'u' | 'e' | 'p' | 'r' | 'z' | 'k' => Ok(()),
            'm' => self.media_line(number, value),
            'a' => self.attribute_line(number, value),
            _ => Err(bad("unknown line type")),
        }
    }

    fn media_line(&mut self, number: usize, value: &'a str) -> Result<(), SdpError> {
        let bad = |reason| malformed(number, reason);
        if self.origin.is_none() || self.session_name.is_none() {
            return Err(bad("o= and s= must come before the first m="));
        }
        if self.media.len() >= MAX_MEDIA {
            return Err(bad("too many media sections"));
        }
        field_count(value).ok_or(bad("m= fields must be single-space separated"))?;
        let mut fields = value.splitn(4, ' ');
        let (Some(media), Some(port), Some(proto), Some(formats)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(bad("m= needs media, port, proto and a format"));
        };
        if !is_token(media) {
            return Err(bad("invalid media type"));
        }
        let (port, count) = match port.split_once('/') {
            Some((port, count)) => (port, Some(count)),
            None => (port, None),
        };
        let port = parse_digits::<u16>(port).ok_or(bad("invalid port"))?;
        if count.is_some_and(|count| parse_digits::<u16>(count).is_none_or(|n| n == 0)) {
            return Err(bad("invalid port count"));
        }
        if !proto.split('/').all(is_token) {
            return Err(bad("invalid proto"));
        }
        if !formats.split(' ').all(is_token) {
            return Err(bad("invalid format"));
        }
        self.media.push(MediaRef {
            media,
            port,
            proto,
            formats,
            attributes: Vec::new(),
        });
        Ok(())
    }

    fn attribute_line(&mut self, number: usize, value: &'a str) -> Result<(), SdpError> {
        let bad = |reason| malformed(number, reason);
        let (name, value) = match value.split_once(':') {
            Some((_, "")) => return Err(bad("empty attribute value")),
            Some((name, value)) => (name, Some(value)),
            None => (value, None),
        };
        if !is_token(name) {
            return Err(bad("invalid attribute name"));
        }
        // Session-level attributes mean nothing to an IM call; they were syntax-checked above.
        let Some(media) = self.media.last_mut() else {
            return Ok(());
        };
        // Checked here, not only in message_media, so that the error can name the line.
        if is_message(media.media) {
            let is_named = |n: &str| name.eq_ignore_ascii_case(n);
            let repeated = media
                .attributes
                .iter()
                .any(|(seen, _)| seen.eq_ignore_ascii_case(name));
            if is_named(ATTR_ACCEPT_TYPES) {
                if repeated {
                    return Err(bad("duplicate a=accept-types"));
                }
                check_accept_types(value).map_err(bad)?;
            } else if is_named(ATTR_MAX_SIZE) {
                if repeated {
                    return Err(bad("duplicate a=max-size"));
                }
                max_size_value(value).map_err(bad)?;
            }
        }
        media.attributes.push((name, value));
        Ok(())
    }

    fn finish(self, last_line: usize) -> Result<Parsed<'a>, SdpError> {
        if last_line == 0 {
            return Err(malformed(0, "empty description"));
        }
        let origin = self.origin.ok_or(malformed(0, "missing o= line"))?;
        let session_name = self.session_name.ok_or(malformed(0, "missing s= line"))?;
        Ok(Parsed {
            origin,
            session_name,
            connection: self.connection,
            media: self.media,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    const SIP_OFFER: &str = "v=0\r\n\
        o=alice 2890844526 2890844526 IN IP4 host.example.com\r\n\
        s=-\r\n\
        c=IN IP4 host.example.com\r\n\
        t=0 0\r\n\
        m=message 5060 sip null\r\n\
        a=accept-types:text/plain message/cpim\r\n\
        a=max-size:4096\r\n";

    /// The shape of the RFC 4975 section 7.3 example offer.
    const MSRP_OFFER: &str = "v=0\r\n\
        o=alice 2890844526 2890844527 IN IP4 alice.example.com\r\n\
        s= -\r\n\
        c=IN IP4 alice.example.com\r\n\
        t=0 0\r\n\
        m=message 7654 TCP/MSRP *\r\n\
        a=accept-types:text/plain\r\n\
        a=path:msrp://alice.example.com:7654/jshA7weztas;tcp\r\n";

    const HEADER: &str = "v=0\r\no=- 0 0 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n";

    #[test]
    fn field_count_agrees_with_fields() {
        for value in [
            "",
            " ",
            "a",
            "a b",
            "a  b",
            " a",
            "a ",
            "a\tb",
            "IN IP4 0.0.0.0",
            "é ü",
            "a b c d e f",
        ] {
            assert_eq!(
                field_count(value),
                fields(value).map(|f| f.len()),
                "{value:?}"
            );
        }
    }

    #[test]
    fn lines_split_as_split_inclusive_does() {
        for text in [
            "",
            "\n",
            "a",
            "a\n",
            "a\r\nb",
            "a\n\nb\n",
            "é\nü\r\n",
            "\n\n",
        ] {
            assert_eq!(
                lines(text).collect::<Vec<_>>(),
                text.split_inclusive('\n').collect::<Vec<_>>(),
                "{text:?}"
            );
        }
    }

    fn with_header(body: &str) -> String {
        format!("{HEADER}{body}")
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    fn malformed_line(text: &str) -> usize {
        match parse(text) {
            Err(SdpError::Malformed { line, .. }) => line,
            other => panic!("expected Malformed for {text:?}, got {other:?}"),
        }
    }

    #[test]
    fn parses_sip_style_offer() {
        let sdp = parse(SIP_OFFER).unwrap();
        assert_eq!(sdp.version, 0);
        assert_eq!(
            sdp.origin,
            "alice 2890844526 2890844526 IN IP4 host.example.com"
        );
        assert_eq!(sdp.session_name, "-");
        assert_eq!(sdp.connection.as_deref(), Some("IN IP4 host.example.com"));
        assert_eq!(
            sdp.media,
            vec![Media {
                media: "message".into(),
                port: 5060,
                proto: "sip".into(),
                formats: strings(&["null"]),
                attributes: vec![
                    (
                        "accept-types".into(),
                        Some("text/plain message/cpim".into())
                    ),
                    ("max-size".into(), Some("4096".into())),
                ],
            }]
        );
        assert_eq!(
            sdp.message_media().unwrap(),
            MessageMedia {
                accept_types: strings(&["text/plain", "message/cpim"]),
                max_size: Some(4096),
            }
        );
    }

    #[test]
    fn parses_msrp_style_offer() {
        let sdp = parse(MSRP_OFFER).unwrap();
        assert_eq!(sdp.session_name, " -");
        let media = &sdp.media[0];
        assert_eq!(media.port, 7654);
        assert_eq!(media.proto, "TCP/MSRP");
        assert_eq!(media.formats, strings(&["*"]));
        assert_eq!(
            media.attributes[1],
            (
                "path".into(),
                Some("msrp://alice.example.com:7654/jshA7weztas;tcp".into())
            )
        );
        assert_eq!(
            offer_media(MSRP_OFFER).unwrap(),
            MessageMedia {
                accept_types: strings(&["text/plain"]),
                max_size: None,
            }
        );
    }

    #[test]
    fn accepts_tls_msrp_and_port_count() {
        let text = with_header("m=message 2855/1 TCP/TLS/MSRP *\r\na=accept-types:*\r\n");
        let media = offer_media(&text).unwrap();
        assert_eq!(media.accept_types, strings(&["*"]));
    }

    #[test]
    fn flag_and_unrelated_attributes_are_kept() {
        let text = with_header("m=message 5060 sip null\r\na=sendrecv\r\na=setup:active\r\n");
        let sdp = parse(&text).unwrap();
        assert_eq!(
            sdp.media[0].attributes,
            vec![
                ("sendrecv".into(), None),
                ("setup".into(), Some("active".into()))
            ]
        );
    }

    #[test]
    fn session_level_attributes_are_ignored() {
        let text = with_header("a=tool:confab\r\na=recvonly\r\nm=message 5060 sip null\r\n");
        let sdp = parse(&text).unwrap();
        assert!(sdp.media[0].attributes.is_empty());
    }

    #[test]
    fn default_accept_types_when_absent() {
        let media = offer_media(&with_header("m=message 5060 sip null\r\n")).unwrap();
        assert_eq!(media.accept_types, strings(&[DEFAULT_ACCEPT_TYPE]));
        assert_eq!(media.max_size, None);
    }

    #[test]
    fn first_usable_message_line_wins() {
        let text = with_header(
            "m=audio 49170 RTP/AVP 0\r\n\
             m=message 0 sip null\r\n\
             a=accept-types:image/png\r\n\
             m=message 9 RTP/AVP 0\r\n\
             m=message 5060 sip null\r\n\
             a=accept-types:text/html\r\n\
             m=message 5061 sip null\r\n\
             a=accept-types:text/plain\r\n",
        );
        assert_eq!(
            offer_media(&text).unwrap().accept_types,
            strings(&["text/html"])
        );
    }

    #[test]
    fn media_and_proto_match_case_insensitively() {
        let text = with_header("m=MESSAGE 5060 tcp/msrp *\r\nA=x\r\n");
        assert_eq!(malformed_line(&text), 6);
        let text = with_header("m=MESSAGE 5060 tcp/msrp *\r\n");
        assert!(offer_media(&text).is_ok());
    }

    #[test]
    fn no_message_media_for_audio_only() {
        let text = with_header("c=IN IP4 0.0.0.0\r\nm=audio 49170 RTP/AVP 0\r\n");
        let err = offer_media(&text).unwrap_err();
        assert_eq!(err, SdpError::NoMessageMedia);
        assert!(err.is_not_acceptable());
    }

    #[test]
    fn no_message_media_for_rejected_stream() {
        let text = with_header("m=message 0 sip null\r\na=accept-types:text/plain\r\n");
        assert_eq!(offer_media(&text), Err(SdpError::NoMessageMedia));
    }

    #[test]
    fn no_message_media_for_unknown_proto_or_no_media() {
        let text = with_header("m=message 5060 RTP/AVP 0\r\n");
        assert_eq!(offer_media(&text), Err(SdpError::NoMessageMedia));
        assert_eq!(offer_media(HEADER), Err(SdpError::NoMessageMedia));
    }

    #[test]
    fn not_acceptable_classification() {
        assert!(SdpError::NoMessageMedia.is_not_acceptable());
        assert!(SdpError::NoCommonType.is_not_acceptable());
        assert!(!SdpError::NotSubset.is_not_acceptable());
        assert!(!malformed(1, "x").is_not_acceptable());
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            malformed(3, "invalid port").to_string(),
            "malformed SDP at line 3: invalid port"
        );
        assert_eq!(
            SdpError::NoMessageMedia.to_string(),
            "no acceptable m=message line"
        );
    }

    #[test]
    fn wildcard_content_type_matching() {
        let any = strings(&["*"]);
        assert!(content_type_allowed(&any, "image/png"));
        assert!(content_type_allowed(&strings(&["*/*"]), "image/png"));
        let text = strings(&["text/*"]);
        assert!(content_type_allowed(&text, "text/plain"));
        assert!(content_type_allowed(&text, "TEXT/HTML"));
        assert!(!content_type_allowed(&text, "image/png"));
        let exact = strings(&["Text/Plain;charset=utf-8", "message/cpim"]);
        assert!(content_type_allowed(&exact, "text/plain"));
        assert!(content_type_allowed(&exact, "text/PLAIN; charset=UTF-8"));
        assert!(content_type_allowed(&exact, "message/CPIM"));
        assert!(!content_type_allowed(&exact, "text/html"));
        assert!(!content_type_allowed(&exact, "text"));
        assert!(!content_type_allowed(&[], "text/plain"));
        // A wildcard is not something a message can be.
        assert!(!content_type_allowed(&any, "*"));
        assert!(!content_type_allowed(&any, "text/*"));
        assert!(!content_type_allowed(&any, ""));
        // Invalid entries in the list are inert.
        assert!(!content_type_allowed(&strings(&["*/plain"]), "text/plain"));
    }

    #[test]
    fn range_coverage_is_set_containment() {
        let r = |s| parse_range(s).unwrap();
        assert!(r("*").covers(r("text/*")));
        assert!(r("text/*").covers(r("text/plain")));
        assert!(r("text/*").covers(r("TEXT/*")));
        assert!(!r("text/plain").covers(r("text/*")));
        assert!(!r("text/*").covers(r("*")));
        assert!(!r("text/*").covers(r("image/png")));
        assert!(parse_range("*/plain").is_none());
        assert!(parse_range("text/").is_none());
        assert!(parse_range("text/plain;").is_none());
        assert!(parse_range("text/plain;a b").is_none());
        assert!(parse_range("text").is_none());
        assert!(parse_range("-text/plain").is_none());
    }

    #[test]
    fn negotiate_wildcard_in_offer() {
        let offer = build_offer(&["text/*"], None);
        let answer = build_offer(&["text/plain", "text/html"], None);
        let negotiated = negotiate(&offer, &answer).unwrap();
        assert_eq!(
            negotiated.accept_types,
            strings(&["text/plain", "text/html"])
        );
        assert!(negotiated.allows("text/html"));
        assert!(!negotiated.allows("text/xml"));
    }

    #[test]
    fn negotiate_wildcard_in_answer_must_fit() {
        let offer = build_offer(&["text/plain"], None);
        let answer = build_offer(&["text/*"], None);
        assert_eq!(negotiate(&offer, &answer), Err(SdpError::NotSubset));
        let offer = build_offer(&["*"], None);
        assert!(negotiate(&offer, &answer).is_ok());
    }

    #[test]
    fn negotiate_not_subset() {
        let offer = build_offer(&["text/plain"], None);
        let answer = build_offer(&["text/plain", "image/png"], None);
        let err = negotiate(&offer, &answer).unwrap_err();
        assert_eq!(err, SdpError::NotSubset);
        assert!(!err.is_not_acceptable());
    }

    #[test]
    fn negotiate_needs_message_media_on_both_sides() {
        let good = build_offer(&["text/plain"], None);
        let audio = with_header("m=audio 49170 RTP/AVP 0\r\n");
        assert_eq!(negotiate(&audio, &good), Err(SdpError::NoMessageMedia));
        assert_eq!(negotiate(&good, &audio), Err(SdpError::NoMessageMedia));
        assert!(matches!(
            negotiate(&good, "garbage"),
            Err(SdpError::Malformed { .. })
        ));
    }

    #[test]
    fn max_size_min_rule() {
        let size = |offer: Option<u64>, answer: Option<u64>| {
            negotiate(
                &build_offer(&["text/plain"], offer),
                &build_offer(&["text/plain"], answer),
            )
            .unwrap()
            .max_size
        };
        assert_eq!(size(Some(100), Some(50)), Some(50));
        assert_eq!(size(Some(50), Some(100)), Some(50));
        assert_eq!(size(Some(100), None), Some(100));
        assert_eq!(size(None, Some(7)), Some(7));
        assert_eq!(size(None, None), None);
        assert_eq!(size(Some(u64::MAX), Some(0)), Some(0));
    }

    #[test]
    fn build_offer_round_trip() {
        let offer = build_offer(&["text/plain", "text/*", "image/png;q=1"], Some(65536));
        assert_eq!(
            offer,
            "v=0\r\no=- 0 0 IN IP4 0.0.0.0\r\ns=-\r\nc=IN IP4 0.0.0.0\r\nt=0 0\r\n\
             m=message 5060 sip null\r\n\
             a=accept-types:text/plain text/* image/png;q=1\r\n\
             a=max-size:65536\r\n"
        );
        let sdp = parse(&offer).unwrap();
        assert_eq!(sdp.origin, "- 0 0 IN IP4 0.0.0.0");
        assert_eq!(sdp.connection.as_deref(), Some("IN IP4 0.0.0.0"));
        assert_eq!(
            sdp.message_media().unwrap(),
            MessageMedia {
                accept_types: strings(&["text/plain", "text/*", "image/png;q=1"]),
                max_size: Some(65536),
            }
        );
    }

    #[test]
    fn build_offer_drops_invalid_types() {
        let offer = build_offer(&["text/plain\r\nm=audio 1 RTP/AVP 0", "bogus"], None);
        assert!(!offer.contains("audio"));
        assert!(!offer.contains("max-size"));
        let sdp = parse(&offer).unwrap();
        assert_eq!(sdp.media.len(), 1);
        assert_eq!(
            sdp.message_media().unwrap().accept_types,
            strings(&[DEFAULT_ACCEPT_TYPE])
        );
        assert_eq!(
            offer_media(&build_offer(&[], None)).unwrap().accept_types,
            strings(&[DEFAULT_ACCEPT_TYPE])
        );
    }

    #[test]
    fn build_answer_negotiate_round_trip() {
        let offer = build_offer(&["text/plain", "text/html", "image/png"], Some(1000));
        let answer = build_answer(&offer, &["image/png", "text/plain"], Some(500)).unwrap();
        let negotiated = negotiate(&offer, &answer).unwrap();
        // The offerer's preference order is kept.
        assert_eq!(
            negotiated,
            Negotiated {
                accept_types: strings(&["text/plain", "image/png"]),
                max_size: Some(500),
            }
        );
    }

    #[test]
    fn build_answer_resolves_wildcards() {
        let offer = build_offer(&["*"], None);
        let answer = build_answer(&offer, &["text/plain", "image/png"], None).unwrap();
        assert_eq!(
            offer_media(&answer).unwrap().accept_types,
            strings(&["text/plain", "image/png"])
        );

        let offer = build_offer(&["text/plain", "message/cpim"], None);
        let answer = build_answer(&offer, &["*"], None).unwrap();
        assert_eq!(
            offer_media(&answer).unwrap().accept_types,
            strings(&["text/plain", "message/cpim"])
        );

        let offer = build_offer(&["text/*", "image/png"], None);
        let answer = build_answer(&offer, &["text/html", "image/*", "text/plain"], None).unwrap();
        assert_eq!(
            offer_media(&answer).unwrap().accept_types,
            strings(&["text/html", "text/plain", "image/png"])
        );
        assert!(negotiate(&offer, &answer).is_ok());
    }

    #[test]
    fn build_answer_skips_redundant_types() {
        let offer = build_offer(&["text/plain"], None);
        let answer = build_answer(&offer, &["text/*", "TEXT/PLAIN", "*"], None).unwrap();
        assert_eq!(
            offer_media(&answer).unwrap().accept_types,
            strings(&["text/plain"])
        );
    }

    #[test]
    fn build_answer_uses_default_offer_types() {
        let offer = with_header("m=message 5060 sip null\r\n");
        let answer = build_answer(&offer, &["text/*"], None).unwrap();
        assert_eq!(
            offer_media(&answer).unwrap().accept_types,
            strings(&["text/plain"])
        );
    }

    #[test]
    fn build_answer_keeps_m_lines_aligned() {
        let answer = build_answer(
            &with_header(
                "m=audio 49170/2 RTP/AVP 0 8\r\n\
                 m=message 7654 TCP/MSRP *\r\n\
                 a=accept-types:text/plain\r\n",
            ),
            &["text/plain"],
            Some(10),
        )
        .unwrap();
        let sdp = parse(&answer).unwrap();
        assert_eq!(sdp.media.len(), 2);
        assert_eq!(
            (sdp.media[0].media.as_str(), sdp.media[0].port),
            ("audio", 0)
        );
        assert_eq!(sdp.media[0].formats, strings(&["0", "8"]));
        assert_eq!(sdp.media[1].proto, "TCP/MSRP");
        assert_eq!(sdp.media[1].port, PLACEHOLDER_PORT);
        assert_eq!(sdp.message_media().unwrap().max_size, Some(10));
    }

    #[test]
    fn build_answer_errors() {
        let offer = build_offer(&["text/plain"], None);
        let err = build_answer(&offer, &["image/png", "not a type"], None).unwrap_err();
        assert_eq!(err, SdpError::NoCommonType);
        assert_eq!(build_answer(&offer, &[], None), Err(SdpError::NoCommonType));
        let audio = with_header("m=audio 49170 RTP/AVP 0\r\n");
        assert_eq!(
            build_answer(&audio, &["*"], None),
            Err(SdpError::NoMessageMedia)
        );
        assert!(matches!(
            build_answer("", &["*"], None),
            Err(SdpError::Malformed { line: 0, .. })
        ));
    }

    #[test]
    fn lf_only_and_mixed_line_endings() {
        let lf = SIP_OFFER.replace("\r\n", "\n");
        assert_eq!(parse(&lf), parse(SIP_OFFER));
        let unterminated = lf.trim_end_matches('\n');
        assert_eq!(parse(unterminated), parse(SIP_OFFER));
        let mixed = SIP_OFFER.replacen("\r\n", "\n", 3);
        assert_eq!(parse(&mixed), parse(SIP_OFFER));
    }

    #[test]
    fn only_one_trailing_empty_line_is_ignored() {
        assert!(parse(SIP_OFFER).is_ok());
        assert_eq!(malformed_line(&format!("{SIP_OFFER}\r\n")), 9);
        assert_eq!(malformed_line(&format!("{SIP_OFFER}\n")), 9);
    }

    #[test]
    fn malformed_empty_input() {
        assert_eq!(malformed_line(""), 0);
        assert_eq!(malformed_line("\n"), 1);
        assert_eq!(malformed_line("\r\n"), 1);
    }

    #[test]
    fn malformed_version_line() {
        assert_eq!(malformed_line("o=- 0 0 IN IP4 0.0.0.0\r\ns=-\r\n"), 1);
        assert_eq!(
            malformed_line("v=1\r\no=- 0 0 IN IP4 0.0.0.0\r\ns=-\r\n"),
            1
        );
        assert_eq!(malformed_line("v=00\r\n"), 1);
        assert_eq!(malformed_line("v= 0\r\n"), 1);
        assert_eq!(malformed_line(&with_header("v=0\r\n")), 5);
    }

    #[test]
    fn malformed_missing_origin_or_name() {
        assert_eq!(malformed_line("v=0\r\n"), 0);
        assert_eq!(malformed_line("v=0\r\no=- 0 0 IN IP4 0.0.0.0\r\n"), 0);
        assert_eq!(malformed_line("v=0\r\ns=-\r\n"), 0);
        assert_eq!(
            malformed_line("v=0\r\ns=-\r\nm=message 5060 sip null\r\n"),
            3
        );
        assert_eq!(
            malformed_line("v=0\r\no=- 0 0 IN IP4 0.0.0.0\r\nm=message 5060 sip null\r\n"),
            3
        );
    }

    #[test]
    fn malformed_session_lines() {
        assert_eq!(malformed_line("v=0\r\no=- 0 0 IN IP4\r\ns=-\r\n"), 2);
        assert_eq!(malformed_line("v=0\r\no=-  0 0 IN IP4 x\r\ns=-\r\n"), 2);
        assert_eq!(
            malformed_line(&with_header("o=- 0 0 IN IP4 0.0.0.0\r\n")),
            5
        );
        assert_eq!(malformed_line(&with_header("s=again\r\n")), 5);
        assert_eq!(malformed_line(&with_header("i=\r\n")), 5);
        assert_eq!(malformed_line(&with_header("c=IN IP4\r\n")), 5);
        assert_eq!(
            malformed_line(&with_header("c=IN IP4 a\r\nc=IN IP4 b\r\n")),
            6
        );
        assert_eq!(malformed_line(&with_header("t=now later\r\n")), 5);
        assert_eq!(malformed_line(&with_header("b=AS\r\n")), 5);
        assert!(parse(&with_header("b=AS:64\r\ni=info\r\nu=http://x\r\ne=a@b\r\np=+1 555\r\nr=7d 1h 0 25h\r\nz=0 0\r\nk=prompt\r\n")).is_ok());
    }

    #[test]
    fn malformed_bad_port() {
        for port in ["70000", "65536", "abc", "+1", "-1", "", "1/0", "1/x", "1/"] {
            let text = with_header(&format!("m=message {port} sip null\r\n"));
            assert_eq!(malformed_line(&text), 5, "port {port:?}");
        }
        let text = with_header("m=message 65535 sip null\r\n");
        assert_eq!(parse(&text).unwrap().media[0].port, 65535);
    }

    #[test]
    fn malformed_media_lines() {
        for m in [
            "m=message 5060 sip",
            "m=message 5060",
            "m=message",
            "m=message  5060 sip null",
            "m=message 5060 sip null ",
            "m=mess(age 5060 sip null",
            "m=message 5060 TCP//MSRP *",
            "m=message 5060 sip nu\"ll",
            "m=message\t5060 sip null",
        ] {
            assert_eq!(
                malformed_line(&with_header(&format!("{m}\r\n"))),
                5,
                "{m:?}"
            );
        }
    }

    #[test]
    fn malformed_bad_letter() {
        assert_eq!(malformed_line(&with_header("x=foo\r\n")), 5);
        assert_eq!(malformed_line(&with_header("A=foo\r\n")), 5);
        assert_eq!(malformed_line(&with_header("vv=0\r\n")), 5);
        assert_eq!(malformed_line(&with_header("a foo\r\n")), 5);
        assert_eq!(malformed_line(&with_header("=foo\r\n")), 5);
        assert_eq!(malformed_line(&with_header("é=foo\r\n")), 5);
        assert_eq!(malformed_line(&with_header("a\r\n")), 5);
    }

    #[test]
    fn malformed_session_line_inside_media() {
        for line in ["t=0 0", "s=-", "o=- 0 0 IN IP4 0.0.0.0", "z=0 0", "e=a@b"] {
            let text = with_header(&format!("m=message 5060 sip null\r\n{line}\r\n"));
            assert_eq!(malformed_line(&text), 6, "{line:?}");
        }
        let media_level =
            "m=message 5060 sip null\r\ni=chat\r\nc=IN IP4 1.2.3.4\r\nb=AS:1\r\nk=prompt\r\n";
        let sdp = parse(&with_header(media_level)).unwrap();
        assert_eq!(sdp.connection, None);
    }

    #[test]
    fn malformed_garbage_bytes() {
        let garbage = String::from_utf8_lossy(&[0xff, 0x00, 0x13, b'v', b'=', 0x80, 0x0a]);
        assert!(matches!(
            parse(&garbage),
            Err(SdpError::Malformed { line: 1, .. })
        ));
        assert_eq!(malformed_line("v=0\0\r\n"), 1);
        assert_eq!(malformed_line(&with_header("s\u{7f}=x\r\n")), 5);
        assert_eq!(malformed_line(&with_header("i=a\u{85}b\r\n")), 5);
        assert_eq!(malformed_line(&with_header("i=a\rb\r\n")), 5);
        // A CR-only line ending is not a line ending.
        assert_eq!(malformed_line("v=0\ro=- 0 0 IN IP4 0.0.0.0\r\n"), 1);
        assert_eq!(malformed_line(&format!("{HEADER}i=x\r")), 5);
        // Tabs are allowed in free-text values.
        assert!(parse(&with_header("i=a\tb\r\n")).is_ok());
    }

    #[test]
    fn malformed_attributes() {
        let m = "m=message 5060 sip null\r\n";
        for attr in [
            "a=accept-types:",
            "a=accept-types",
            "a=accept-types: text/plain",
            "a=accept-types:text/plain  text/html",
            "a=accept-types:text/plain ",
            "a=accept-types:*/plain",
            "a=accept-types:text",
            "a=max-size:",
            "a=max-size",
            "a=max-size:-1",
            "a=max-size:+1",
            "a=max-size:1.5",
            "a=max-size:18446744073709551616",
            "a=bad name:x",
            "a=:x",
        ] {
            let text = with_header(&format!("{m}{attr}\r\n"));
            assert_eq!(malformed_line(&text), 6, "{attr:?}");
        }
        let dup = with_header(&format!(
            "{m}a=accept-types:text/plain\r\na=Accept-Types:text/html\r\n"
        ));
        assert_eq!(malformed_line(&dup), 7);
        let dup = with_header(&format!("{m}a=max-size:1\r\na=max-size:2\r\n"));
        assert_eq!(malformed_line(&dup), 7);
        let max = with_header(&format!("{m}a=max-size:18446744073709551615\r\n"));
        assert_eq!(offer_media(&max).unwrap().max_size, Some(u64::MAX));
        // The message rules apply to message media only.
        let audio = with_header("m=audio 1 RTP/AVP 0\r\na=max-size:huge\r\n");
        assert!(parse(&audio).is_ok());
    }

    #[test]
    fn hand_built_descriptions_are_revalidated() {
        let mut sdp = parse(&build_offer(&["text/plain"], None)).unwrap();
        sdp.media[0]
            .attributes
            .push(("max-size".into(), Some("lots".into())));
        assert!(matches!(
            sdp.message_media(),
            Err(SdpError::Malformed { line: 0, .. })
        ));
    }

    #[test]
    fn line_limit() {
        let filler = MAX_LINES - 4;
        let ok = format!("{HEADER}{}", "a=x\r\n".repeat(filler));
        assert!(parse(&ok).is_ok());
        let too_many = format!("{ok}a=x\r\n");
        assert_eq!(malformed_line(&too_many), MAX_LINES + 1);
        let huge = format!("{HEADER}{}", "a=x\n".repeat(1_000_000));
        assert_eq!(malformed_line(&huge), MAX_LINES + 1);
    }

    #[test]
    fn media_section_limit() {
        let ok = format!("{HEADER}{}", "m=message 0 sip null\r\n".repeat(MAX_MEDIA));
        assert_eq!(parse(&ok).unwrap().media.len(), MAX_MEDIA);
        let too_many = format!("{ok}m=message 5060 sip null\r\n");
        assert_eq!(malformed_line(&too_many), 4 + MAX_MEDIA + 1);
    }

    fn fragment() -> impl Strategy<Value = String> {
        prop_oneof![
            8 => Just("m=message 5060 sip null".to_owned()),
            8 => Just("a=accept-types:text/* image/png".to_owned()),
            4 => Just("a=max-size:100".to_owned()),
            1 => Just("v=0".to_owned()),
            1 => Just("o=- 0 0 IN IP4 0.0.0.0".to_owned()),
            1 => Just("s=-".to_owned()),
            1 => Just("c=IN IP4 0.0.0.0".to_owned()),
            1 => Just("t=0 0".to_owned()),
            1 => Just("m=message 0 sip null".to_owned()),
            1 => Just("m=message 7654 TCP/MSRP *".to_owned()),
            1 => Just("m=audio 49170 RTP/AVP 0".to_owned()),
            1 => Just("a=accept-types:text/plain".to_owned()),
            1 => Just("a=accept-types:*".to_owned()),
            1 => Just(String::new()),
            1 => "m=[a-z]{1,8} [0-9+/-]{0,8} [A-Za-z/]{0,12}( [*a-z0-9]{0,4}){0,3}",
            1 => "a=accept-types:[a-zA-Z*/;= +.-]{0,30}",
            1 => "a=max-size:[0-9+-]{0,25}",
            1 => "a=[a-z-]{0,12}(:[ -~]{0,20})?",
            1 => "[a-zA-Z=]=[ -~\\t]{0,20}",
            1 => "\\PC{0,12}",
            1 => "[\\x00-\\x1f\\x7f\\u{85}]{1,3}",
        ]
    }

    fn content_type() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("*".to_owned()),
            "[a-z][a-z0-9]{0,7}/\\*",
            "[a-z][a-z0-9]{0,7}/[a-z0-9][a-z0-9.+-]{0,7}(;[a-z]{1,5}=[a-z0-9]{1,5})?",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn parse_never_panics_on_arbitrary_strings(text in any::<String>()) {
            let _ = parse(&text);
            let _ = build_answer(&text, &["*"], Some(1));
        }

        #[test]
        fn parse_never_panics_on_line_soup(
            header in any::<bool>(),
            lines in vec(fragment(), 0..40),
            crlf in any::<bool>(),
            terminated in any::<bool>(),
        ) {
            let separator = if crlf { "\r\n" } else { "\n" };
            // A valid header gets most soups past line 4, where the interesting rules live.
            let prefix = if header { HEADER.replace("\r\n", separator) } else { String::new() };
            let mut text = prefix + &lines.join(separator);
            if terminated {
                text.push_str(separator);
            }
            // The node reads offers and answers without copying their fields
            // (`parse_borrowed`); it must find what the owned description finds.
            let owned = parse(&text);
            if let Ok(sdp) = &owned {
                prop_assert!(sdp.media.len() <= MAX_MEDIA);
            }
            prop_assert_eq!(offer_media(&text), owned.and_then(|sdp| sdp.message_media()));
            if let Ok(answer) = build_answer(&text, &["text/plain", "image/*"], None) {
                prop_assert!(negotiate(&text, &answer).is_ok());
            }
            let _ = negotiate(&text, &text);
        }

        #[test]
        fn built_offers_round_trip(
            types in vec(content_type(), 1..6),
            max_size in proptest::option::of(any::<u64>()),
        ) {
            let refs: Vec<&str> = types.iter().map(String::as_str).collect();
            let media = offer_media(&build_offer(&refs, max_size));
            prop_assert_eq!(media, Ok(MessageMedia { accept_types: types.clone(), max_size }));
        }

        #[test]
        fn built_answers_negotiate_within_both_sides(
            offered in vec(content_type(), 1..6),
            supported in vec(content_type(), 0..6),
            offer_max in proptest::option::of(any::<u64>()),
            answer_max in proptest::option::of(any::<u64>()),
        ) {
            let offered: Vec<&str> = offered.iter().map(String::as_str).collect();
            let supported: Vec<&str> = supported.iter().map(String::as_str).collect();
            let offer = build_offer(&offered, offer_max);
            match build_answer(&offer, &supported, answer_max) {
                Ok(answer) => {
                    let negotiated = negotiate(&offer, &answer);
                    prop_assert!(negotiated.is_ok(), "{:?}", negotiated);
                    if let Ok(negotiated) = negotiated {
                        prop_assert!(!negotiated.accept_types.is_empty());
                        for t in &negotiated.accept_types {
                            let range = parse_range(t);
                            prop_assert!(range.is_some());
                            if let Some(range) = range {
                                prop_assert!(supported
                                    .iter()
                                    .filter_map(|s| parse_range(s))
                                    .any(|s| s.covers(range)));
                            }
                        }
                        let expected = match (offer_max, answer_max) {
                            (Some(a), Some(b)) => Some(a.min(b)),
                            (a, b) => a.or(b),
                        };
                        prop_assert_eq!(negotiated.max_size, expected);
                    }
                }
                Err(err) => prop_assert_eq!(err, SdpError::NoCommonType),
            }
        }
    }
}
