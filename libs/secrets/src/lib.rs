//! Secrets: sealing values with AES-256-GCM, opening them, and masking them in output.
//!
//! A value is sealed where it enters (the gateway) with the current key and opened only where it
//! is used (the executor, for a step that declares it). What travels and is stored is a
//! [`Sealed`] value: the key's id, a random 96-bit nonce, and the ciphertext with its tag. The
//! secret's name is bound into the tag (associated data), so a sealed value cannot be moved to
//! another name or tenant. Rotation: configure a new current key and keep the old ones as
//! previous keys until every secret has been set again.
//!
//! # Layout
//! Everything is in this file: [`Keyring`], [`Sealed`], [`mask`] and [`masked_forms`].

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("a secrets key must be 32 bytes, base64-encoded")]
    BadKey,
    #[error("no key with id {0} is configured (was it rotated out too early?)")]
    UnknownKey(String),
    #[error("the sealed value does not open with its key (tampered, or another name)")]
    Corrupt,
}

/// A sealed secret value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Sealed {
    /// Which key sealed it: the first 8 hex digits of the key's SHA-256.
    pub key_id: String,
    /// Base64 of the 12-byte nonce.
    pub nonce: String,
    /// Base64 of the ciphertext and tag.
    pub ciphertext: String,
}

struct Key {
    id: String,
    cipher: Aes256Gcm,
}

/// The configured keys: the current one seals, any of them opens.
pub struct Keyring {
    keys: Vec<Key>,
}

impl Keyring {
    /// `current` and `previous` are base64-encoded 32-byte keys.
    pub fn new(current: &str, previous: &[&str]) -> Result<Self, SecretError> {
        let keys = std::iter::once(current)
            .chain(previous.iter().copied())
            .map(|k| {
                let bytes = STANDARD.decode(k.trim()).map_err(|_| SecretError::BadKey)?;
                let cipher = Aes256Gcm::new_from_slice(&bytes).map_err(|_| SecretError::BadKey)?;
                let id = hex::encode(&hmac_sha256::Hash::hash(&bytes)[..4]);
                Ok(Key { id, cipher })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { keys })
    }

    /// A fresh random key, base64-encoded.
    pub fn generate_key() -> String {
        STANDARD.encode(rand::random::<[u8; 32]>())
    }

    /// Seals `value` for the secret `name` (bound into the tag) with the current key.
    pub fn seal(&self, name: &str, value: &[u8]) -> Sealed {
        let key = &self.keys[0];
        let nonce: [u8; 12] = rand::random();
        let ciphertext = key
            .cipher
            .encrypt(&Nonce::from(nonce), Payload { msg: value, aad: name.as_bytes() })
            .expect("AES-GCM seals any value of a sane size");
        Sealed { key_id: key.id.clone(), nonce: STANDARD.encode(nonce), ciphertext: STANDARD.encode(ciphertext) }
    }

    /// Opens a value sealed for `name`.
    pub fn open(&self, name: &str, sealed: &Sealed) -> Result<Vec<u8>, SecretError> {
        let key = self
            .keys
            .iter()
            .find(|k| k.id == sealed.key_id)
            .ok_or_else(|| SecretError::UnknownKey(sealed.key_id.clone()))?;
        let nonce = STANDARD.decode(&sealed.nonce).map_err(|_| SecretError::Corrupt)?;
        let ciphertext = STANDARD.decode(&sealed.ciphertext).map_err(|_| SecretError::Corrupt)?;
        let nonce: [u8; 12] = nonce.try_into().map_err(|_| SecretError::Corrupt)?;
        key.cipher
            .decrypt(&Nonce::from(nonce), Payload { msg: &ciphertext, aad: name.as_bytes() })
            .map_err(|_| SecretError::Corrupt)
    }
}

/// The associated data a step secret is sealed with: bound to its tenant and name.
pub fn step_secret_aad(tenant: &str, name: &str) -> String {
    format!("{tenant}:secret:{name}")
}

/// The associated data a repository connection's webhook secret is sealed with.
pub fn repo_secret_aad(tenant: &str) -> String {
    format!("{tenant}:repo-connection")
}

/// The associated data a repository connection's status token is sealed with: not the webhook
/// secret's, so neither can stand in for the other.
pub fn repo_status_token_aad(tenant: &str) -> String {
    format!("{tenant}:repo-connection:status-token")
}

/// The associated data a webhook endpoint's signing secret is sealed with.
pub fn endpoint_secret_aad(tenant: &str) -> String {
    format!("{tenant}:webhook-endpoint")
}

/// The shortest line of a multi-line secret that a log line equal to it is masked for.
const MIN_LINE_MASKED: usize = 6;
/// The shortest beginning of a secret masked where a text was cut short.
const MIN_PREFIX_MASKED: usize = 3;

/// The shortest value whose encoded forms ([`masked_forms`]) are masked too: shorter ones
/// encode to a few characters that ordinary text holds by chance.
const MIN_ENCODED: usize = 6;

/// The characters URL encoders commonly escape, each set as one encoder does: all but the
/// unreserved characters (RFC 3986); Python's `quote` (which keeps `/`); JavaScript's
/// `encodeURIComponent` (which keeps `!'()*`); and the URL standard's userinfo, path and query
/// sets (as the `url` crate, and browsers, write a URL: an `http` step's own request line; an
/// `http(s)` URL's query escapes `'` too); and form encoding (`application/x-www-form-urlencoded`,
/// as `URLSearchParams`, Java's `URLEncoder` and PHP's `urlencode` write it: `*` kept, `~`
/// escaped; PHP's `urlencode` escapes `*` too).
const URL_SETS: [&percent_encoding::AsciiSet; 9] = {
    use percent_encoding::{AsciiSet, CONTROLS, NON_ALPHANUMERIC};
    const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');
    const QUERY: &AsciiSet = &CONTROLS.add(b' ').add(b'"').add(b'#').add(b'<').add(b'>');
    const PATH: &AsciiSet = &QUERY.add(b'?').add(b'`').add(b'{').add(b'}');
    [
        UNRESERVED,
        &UNRESERVED.remove(b'/'),
        &UNRESERVED.remove(b'!').remove(b'\'').remove(b'(').remove(b')').remove(b'*'),
        &PATH.add(b'/').add(b':').add(b';').add(b'=').add(b'@').add(b'[').add(b'\\').add(b']').add(b'^').add(b'|'),
        PATH,
        QUERY,
        &QUERY.add(b'\''),
        &NON_ALPHANUMERIC.remove(b'*').remove(b'-').remove(b'.').remove(b'_'),
        &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_'),
    ]
};

/// The values and, for each of at least [`MIN_ENCODED`] bytes, the forms a step is likely to
/// print it in: URL-encoded as common encoders do ([`URL_SETS`]; spaces as `%20` and as `+`),
/// escaped as in a JSON string (as serde and JavaScript write it, as Python writes it with
/// `\uXXXX` for each non-ASCII character, as Go writes `<`, `>` and `&`, as PHP writes `/`), in
/// hexadecimal, and in base64 (standard and URL-safe), at each of the three offsets it can start
/// at inside longer encoded text (a token in a basic-auth header or a config file printed
/// encoded): only the characters that depend on the value alone. Duplicates and forms equal to
/// the value are left out.
pub fn masked_forms(values: &[String]) -> Vec<String> {
    use base64::engine::general_purpose::URL_SAFE;
    let mut forms: Vec<String> = Vec::new();
    let add = |form: String, forms: &mut Vec<String>| {
        if !form.is_empty() && !forms.contains(&form) {
            forms.push(form);
        }
    };
    for v in values.iter().filter(|v| !v.is_empty()) {
        add(v.clone(), &mut forms);
        if v.len() < MIN_ENCODED {
            continue;
        }
        for set in URL_SETS {
            let url = percent_encoding::utf8_percent_encode(v, set).to_string();
            // RFC 3986 takes an escape's hex digits in either case; some encoders write them
            // in lower case (Erlang's `uri_string`, hand-rolled ones).
            let lower = lowercase_escapes(&url);
            add(lower.replace("%20", "+"), &mut forms);
            add(lower, &mut forms);
            add(url.replace("%20", "+"), &mut forms);
            add(url, &mut forms);
        }
        let json = serde_json::to_string(v).unwrap_or_default();
        let json = json.strip_prefix('"').and_then(|j| j.strip_suffix('"')).unwrap_or_default().to_string();
        let mut ascii = String::new();
        for c in json.chars() {
            if c.is_ascii() {
                ascii.push(c);
            } else {
                for unit in c.encode_utf16(&mut [0; 2]) {
                    ascii.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
        add(ascii.replace('/', "\\/"), &mut forms);
        add(ascii, &mut forms);
        add(json.replace('<', "\\u003c").replace('>', "\\u003e").replace('&', "\\u0026"), &mut forms);
        add(json.replace('/', "\\/"), &mut forms);
        add(json, &mut forms);
        add(hex::encode(v), &mut forms);
        add(hex::encode_upper(v), &mut forms);
        for shift in 0..3usize {
            let mut bytes = vec![0u8; shift];
            bytes.extend_from_slice(v.as_bytes());
            // The characters that hold none of the bytes before the value or after it.
            let (from, to) = ((shift * 8).div_ceil(6), bytes.len() * 8 / 6);
            for engine in [&STANDARD, &URL_SAFE] {
                let encoded = engine.encode(&bytes);
                add(encoded[from..to].to_string(), &mut forms);
            }
        }
    }
    forms.sort_by_key(|f| std::cmp::Reverse(f.len()));
    forms
}

/// `url` with each percent-escape's hex digits in lower case (`%2F` as `%2f`): a `%` followed
/// by two hex digits (a `%` the encoder kept, followed by anything else, is left as it is).
fn lowercase_escapes(url: &str) -> String {
    let mut out = url.as_bytes().to_vec();
    let mut i = 0;
    while i + 2 < out.len() {
        if out[i] == b'%' && out[i + 1].is_ascii_hexdigit() && out[i + 2].is_ascii_hexdigit() {
            out[i + 1].make_ascii_lowercase();
            out[i + 2].make_ascii_lowercase();
            i += 3;
        } else {
            i += 1;
        }
    }
    String::from_utf8(out).expect("only ASCII letters changed")
}

/// The non-empty values, longest first, so one that contains another is masked whole.
fn masked_values(values: &[String]) -> Vec<&str> {
    let mut masked: Vec<&str> = values.iter().map(String::as_str).filter(|v| !v.is_empty()).collect();
    // (Forms from `masked_forms` come sorted already.)
    if !masked.is_sorted_by_key(|v| std::cmp::Reverse(v.len())) {
        masked.sort_by_key(|v| std::cmp::Reverse(v.len()));
    }
    masked
}

/// Replaces every occurrence of each value in `text` with `***`. Empty values are ignored;
/// longer values are replaced first, so one that contains another is masked whole. Encoded
/// text wrapped at a width (lines of base64 or hex characters, as `base64`, `openssl` and
/// `xxd -p` print it) has what it holds of a value masked on each line, across the breaks
/// ([`mask_wrapped`]).
pub fn mask(text: &str, values: &[String]) -> String {
    let values = masked_values(values);
    let mut out = text.to_string();
    for v in &values {
        if out.contains(v) {
            out = out.replace(v, "***");
        }
    }
    if out.contains('%') {
        out = mask_mixed_escapes(out, &values);
    }
    if out.lines().any(is_wrapped_line) { mask_wrapped(&out, &values) } else { out }
}

/// Masks the URL-encoded forms of `values` that `text` writes with escapes in both cases
/// (`%2f%2B`), which no form matches as it is: escapes in lower case throughout, in `text` and
/// in each value, are compared. Lowering a hex digit moves no byte, so `text` and its lowered
/// copy are masked at the same places, one value after another (longest first), as [`mask`]
/// masks the values themselves.
fn mask_mixed_escapes(text: String, values: &[&str]) -> String {
    let mut lowered: Vec<String> = Vec::new();
    for v in values.iter().filter(|v| v.contains('%')) {
        let v = lowercase_escapes(v);
        if !lowered.contains(&v) {
            lowered.push(v);
        }
    }
    if lowered.is_empty() {
        return text;
    }
    let mut folded = lowercase_escapes(&text);
    if folded == text {
        // No escape in upper case: the forms in lower case were matched as they are.
        return text;
    }
    let mut text = text;
    for v in &lowered {
        if !folded.contains(v.as_str()) {
            continue;
        }
        let (mut masked, mut masked_folded) = (String::with_capacity(text.len()), String::with_capacity(text.len()));
        let mut at = 0;
        for (from, _) in folded.match_indices(v.as_str()) {
            masked.push_str(&text[at..from]);
            masked_folded.push_str(&folded[at..from]);
            masked.push_str("***");
            masked_folded.push_str("***");
            at = from + v.len();
        }
        masked.push_str(&text[at..]);
        masked_folded.push_str(&folded[at..]);
        (text, folded) = (masked, masked_folded);
    }
    text
}

/// The shortest piece of a value masked at the edge of a line of wrapped encoded text that is
/// not followed (or preceded) by the rest of it: a log, masked a line at a time.
const MIN_WRAPPED: usize = 16;
/// The shortest value looked for across the lines of wrapped encoded text.
const MIN_ACROSS: usize = 8;
/// The longest line taken for a line of wrapped encoded text.
const MAX_WRAPPED: usize = 256;

/// Whether `line` may be a line of encoded text wrapped at a width: up to [`MAX_WRAPPED`]
/// characters of the base64 alphabets (standard and URL-safe, with padding), which hexadecimal
/// is part of, and at least 4.
fn is_wrapped_line(line: &str) -> bool {
    let line = line.trim_end_matches('\r');
    (4..=MAX_WRAPPED).contains(&line.len()) && line.bytes().all(|b| b.is_ascii_alphanumeric() || b"+/=-_".contains(&b))
}

/// Masks what the lines of wrapped encoded text in `text` hold of `values`. Consecutive such
/// lines (a block as an encoder wraps it, with whatever short word-like lines touch it: a match
/// across those is as unlikely as anywhere) are joined, and each value of [`MIN_ACROSS`]
/// characters or more is looked for in the joined text: each line's part of a match is masked. A line alone (a log line) has masked what it holds of a
/// value: all of it, its end where a value of [`MIN_WRAPPED`] characters or more starts, its
/// start where one ends.
fn mask_wrapped(text: &str, values: &[&str]) -> String {
    let values: Vec<&str> = values.iter().copied().filter(|v| v.len() >= MIN_ACROSS && v.is_ascii()).collect();
    let lines: Vec<(&str, &str)> = text
        .split_inclusive('\n')
        .map(|l| {
            let body = l.trim_end_matches(['\n', '\r']);
            (body, &l[body.len()..])
        })
        .collect();
    // Each line's ranges masked (byte ranges of its body).
    let mut masked: Vec<Vec<(usize, usize)>> = vec![Vec::new(); lines.len()];
    let mut i = 0;
    while i < lines.len() {
        if !is_wrapped_line(lines[i].0) {
            i += 1;
            continue;
        }
        let mut end = i + 1;
        while end < lines.len() && is_wrapped_line(lines[end].0) {
            end += 1;
        }
        if end - i >= 2 {
            let joined: String = lines[i..end].iter().map(|l| l.0).collect();
            // Where each line starts in the joined text.
            let starts: Vec<usize> = lines[i..end]
                .iter()
                .scan(0, |at, l| {
                    let start = *at;
                    *at += l.0.len();
                    Some(start)
                })
                .collect();
            for v in &values {
                for (from, _) in joined.match_indices(v) {
                    let to = from + v.len();
                    // Each line's share of the match, from the line it starts in.
                    let mut k = starts.partition_point(|&s| s <= from) - 1;
                    while k < starts.len() && starts[k] < to {
                        let (start, stop) = (starts[k], starts[k] + lines[i + k].0.len());
                        masked[i + k].push((from.max(start) - start, to.min(stop) - start));
                        k += 1;
                    }
                }
            }
        }
        for k in i..end {
            masked[k].extend(edges(lines[k].0, &values));
        }
        i = end;
    }
    let mut out = String::with_capacity(text.len());
    for ((body, ending), mut ranges) in lines.into_iter().zip(masked) {
        ranges.sort_unstable();
        // Ranges that overlap or touch are masked as one.
        let (mut at, mut open) = (0, false);
        for (from, to) in ranges {
            if open && from <= at {
                at = at.max(to);
                continue;
            }
            out.push_str(&body[at..from]);
            out.push_str("***");
            (at, open) = (to, true);
        }
        out.push_str(&body[at..]);
        out.push_str(ending);
    }
    out
}

/// The ranges of a line of wrapped encoded text that are pieces of one of `values` (of
/// [`MIN_WRAPPED`] characters or more) on their own: the whole line inside one; its end, where
/// one starts; its start, where one ends.
fn edges(line: &str, values: &[&str]) -> Vec<(usize, usize)> {
    let mut ranges = Vec::new();
    if line.len() < MIN_WRAPPED {
        return ranges;
    }
    for v in values.iter().filter(|v| v.len() >= MIN_WRAPPED) {
        if v.contains(line) {
            return vec![(0, line.len())];
        }
        // The line ends with the value's start: at the first place it starts, the longest.
        let head = &v[..MIN_WRAPPED];
        if let Some(p) = line.match_indices(head).map(|(p, _)| p).find(|&p| v.starts_with(&line[p..])) {
            ranges.push((p, line.len()));
        }
        // The line starts with the value's end.
        let start = &line[..MIN_WRAPPED];
        if let Some(q) = v.match_indices(start).map(|(q, _)| q).find(|&q| line.starts_with(&v[q..])) {
            ranges.push((0, v.len() - q));
        }
    }
    ranges
}

/// Masks one line of a log, which is masked a line at a time, as [`mask`] does, and whole
/// when it is (trimmed) one of the lines of a value of several lines (a key in PEM, say: its
/// lines are printed one at a time, and no log line holds the whole value). Only a line equal
/// to one is masked, of at least [`MIN_LINE_MASKED`] characters, and not a PEM armour line
/// (`-----BEGIN …-----`), so text that merely contains such a line (`users:` in a kubeconfig)
/// stays readable.
pub fn mask_line(line: &str, values: &[String]) -> String {
    let trimmed = line.trim();
    let is_secret_line = trimmed.chars().count() >= MIN_LINE_MASKED
        && !trimmed.starts_with("-----")
        && values.iter().filter(|v| v.contains('\n')).any(|v| v.lines().any(|l| l.trim() == trimmed));
    if is_secret_line { "***".to_string() } else { mask(line, values) }
}

/// Masks `text` as [`mask`] does, `text` being the start of something cut short (output past
/// a limit, an over-long line): where it ends with the beginning of a value (at least
/// [`MIN_PREFIX_MASKED`] characters of it), whose rest was cut off, that end is masked too.
pub fn mask_cut(text: &str, values: &[String]) -> String {
    let mut out = mask(text, values);
    // A cut inside a character leaves a replacement character after the value's beginning.
    let end = out.trim_end_matches('\u{FFFD}').len();
    // Escapes compared in lower case, as `mask` does (positions are the same).
    let folded = lowercase_escapes(&out[..end]);
    let start = masked_values(values).into_iter().filter_map(|v| cut_start(&folded, &lowercase_escapes(v))).min();
    if let Some(start) = start {
        out.truncate(start);
        out.push_str("***");
    }
    out
}

/// Where `text` ends with the beginning of `v` (at least [`MIN_PREFIX_MASKED`] characters of
/// it, not all of it), the longest such: its start in `text`.
fn cut_start(text: &str, v: &str) -> Option<usize> {
    let head_len = v.char_indices().nth(MIN_PREFIX_MASKED).map(|(i, _)| i)?;
    let head = &v[..head_len];
    // A beginning shorter than `v` starts after this.
    let mut at = text.len().saturating_sub(v.len() - 1);
    while !text.is_char_boundary(at) {
        at += 1;
    }
    // Each place `head` starts, overlapping ones included (`aba` twice in `ababa`).
    while let Some(found) = text[at..].find(head) {
        let p = at + found;
        if v.starts_with(&text[p..]) {
            return Some(p);
        }
        at = p + text[p..].chars().next().map_or(1, char::len_utf8);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_opens_rotates_and_binds_the_name() {
        let old = Keyring::generate_key();
        let new = Keyring::generate_key();
        let before = Keyring::new(&old, &[]).unwrap();
        let sealed = before.seal("TOKEN", b"hunter2");
        assert!(!sealed.ciphertext.contains("hunter2"));
        assert_eq!(before.open("TOKEN", &sealed).unwrap(), b"hunter2");
        assert!(matches!(before.open("OTHER", &sealed), Err(SecretError::Corrupt)), "bound to its name");
        // After rotation the old key still opens what it sealed; new values use the new key.
        let after = Keyring::new(&new, &[&old]).unwrap();
        assert_eq!(after.open("TOKEN", &sealed).unwrap(), b"hunter2");
        assert_ne!(after.seal("TOKEN", b"x").key_id, sealed.key_id);
        assert!(matches!(Keyring::new(&new, &[]).unwrap().open("TOKEN", &sealed), Err(SecretError::UnknownKey(_))));
        assert!(Keyring::new("short", &[]).is_err());
    }

    #[test]
    fn masks_each_line_of_a_multi_line_secret_and_a_secret_cut_short() {
        let key = "-----BEGIN KEY-----\r\nMIIEvQIBADANBg\r\nusers:\r\n}\r\n-----END KEY-----".to_string();
        let values = vec![key.clone(), "hunter2-token".to_string(), "abaXYZ".to_string()];
        // Logs are masked a line at a time: a line of the key, printed alone, is masked.
        assert_eq!(mask_line("  MIIEvQIBADANBg\r", &values), "***");
        assert_eq!(mask_line("users:", &values), "***");
        // Text that merely contains one, a short line, or an armour line, is not.
        assert_eq!(mask_line("active users: 42", &values), "active users: 42");
        assert_eq!(mask_line("a } b", &values), "a } b");
        assert_eq!(mask_line("-----BEGIN KEY-----", &values), "-----BEGIN KEY-----");
        assert_eq!(mask_line("token hunter2-token", &values), "token ***");
        assert_eq!(mask("users: MIIEvQIBADANBg", &values), "users: MIIEvQIBADANBg", "whole values only");
        assert_eq!(mask(&format!("k={key}."), &values), "k=***.");
        // Cut off after the beginning of a secret.
        assert_eq!(mask_cut("out: hunter2-to", &values), "out: ***");
        assert_eq!(mask_cut("out: hunter2-token and hun", &values), "out: *** and ***");
        assert_eq!(mask_cut("out: hu", &values), "out: hu", "too short a beginning to tell");
        assert_eq!(mask_cut("out: hunt\u{FFFD}", &values), "out: ***", "cut inside a character after it");
        assert_eq!(mask_cut("x ababa", &values), "x ab***", "a beginning overlapping an earlier match");
        assert_eq!(mask_cut("nothing", &values), "nothing");
        assert_eq!(mask_cut("", &values), "");
    }

    #[test]
    fn masks_a_secret_encoded_as_steps_print_it() {
        use base64::engine::general_purpose::URL_SAFE;
        let secret = "p@ss word/+?&\"x1".to_string();
        let forms = masked_forms(&[secret.clone(), "abc".to_string()]);
        let masked = |text: &str| mask(text, &forms);
        assert_eq!(masked("token=p%40ss%20word%2F%2B%3F%26%22x1&a=1"), "token=***&a=1");
        assert_eq!(masked("token=p%40ss+word%2F%2B%3F%26%22x1"), "token=***");
        // Escapes written in lower case, as RFC 3986 allows.
        assert_eq!(masked("token=p%40ss%20word%2f%2b%3f%26%22x1&a=1"), "token=***&a=1");
        assert_eq!(masked("token=p%40ss+word%2f%2b%3f%26%22x1"), "token=***");
        // Escapes in both cases in one value, as a hand-rolled encoder or an edit may write them.
        assert_eq!(masked("token=p%40ss%20word%2f%2B%3F%26%22x1&a=1"), "token=***&a=1");
        assert_eq!(masked("a=p%40ss+word%2F%2b%3f%26%22x1 b=p%40ss+word%2f%2B%3F%26%22x1."), "a=*** b=***.");
        assert_eq!(masked("100%Pure p%40ss+word%2F%2b"), "100%Pure p%40ss+word%2F%2b", "half a value is not it");
        assert_eq!(masked("ä p%40ss+word%2F%2b%3f%26%22x1 ü"), "ä *** ü", "beside other characters");
        // A value that is a piece of another, masked whole once, and on its own elsewhere.
        let nested = masked_forms(&["ab/cd/ef".to_string(), "xx ab/cd/ef yy".to_string()]);
        assert_eq!(mask("xx%20ab%2fcd%2Fef%20yy and ab%2Fcd%2fef", &nested), "*** and ***");
        // Cut short in a form of mixed case.
        assert_eq!(mask_cut("token=p%40ss+word%2f%2B%3F", &forms), "token=***");
        assert_eq!(lowercase_escapes("a%2Fb%ZZ%C3%A4%"), "a%2fb%ZZ%c3%a4%");
        assert_eq!(lowercase_escapes("100%Pure%2B"), "100%Pure%2b");
        assert_eq!(masked(r#"{"token":"p@ss word/+?&\"x1"}"#), r#"{"token":"***"}"#);
        // In base64, after any number of bytes before it and whatever follows.
        for before in ["", "u", "us", "user:"] {
            for after in ["", "!", "!!", "!!!"] {
                for engine in [&STANDARD, &URL_SAFE] {
                    let text = engine.encode(format!("{before}{secret}{after}"));
                    let out = masked(&text);
                    assert!(out.contains("***"), "{before:?} {after:?}: {text} -> {out}");
                    assert!(out.len() <= text.len() - 8, "{text} -> {out}");
                }
            }
        }
        // As other encoders write it: Python's `quote` and `json.dumps`, hexadecimal.
        let other = "p\u{e4}ss/w\u{f6}rd @!x".to_string();
        let other_forms = masked_forms(&[other]);
        let other_masked = |text: &str| mask(text, &other_forms);
        assert_eq!(other_masked("GET /a?k=p%C3%A4ss/w%C3%B6rd%20%40%21x"), "GET /a?k=***");
        assert_eq!(other_masked(r#"{"k": "p\u00e4ss/w\u00f6rd @!x"}"#), r#"{"k": "***"}"#);
        let php = masked_forms(&["a/b/c-secret".to_string()]);
        assert_eq!(mask(r#"{"k":"a\/b\/c-secret"}"#, &php), r#"{"k":"***"}"#);
        assert_eq!(other_masked(&format!("hex {}", hex::encode("p\u{e4}ss/w\u{f6}rd @!x"))), "hex ***");
        assert_eq!(other_masked(&format!("HEX {}", hex::encode_upper("p\u{e4}ss/w\u{f6}rd @!x"))), "HEX ***");
        // Wrapped at 76 characters, as `base64` prints it: each line's piece of the value.
        let long = "k".repeat(20) + &"0123456789abcdef".repeat(8);
        let long_forms = masked_forms(std::slice::from_ref(&long));
        let encoded = STANDARD.encode(format!("{{\"key\": \"{long}\"}}"));
        let wrapped: String =
            encoded.as_bytes().chunks(76).map(|l| format!("{}\n", std::str::from_utf8(l).unwrap())).collect();
        let out = mask(&wrapped, &long_forms);
        assert!(out.lines().all(|l| l.contains("***")), "{wrapped}\n->\n{out}");
        let joined = out.replace('\n', "");
        for form in long_forms.iter().filter(|f| f.len() >= 8) {
            for piece in form.as_bytes().windows(8) {
                assert!(!joined.contains(std::str::from_utf8(piece).unwrap()), "{out}");
            }
        }
        assert_eq!(mask("SGVsbG8gd29ybGQgaGVsbG8gd29ybGQ=\n", &long_forms), "SGVsbG8gd29ybGQgaGVsbG8gd29ybGQ=\n");
        // After a short line that looks encoded too (`echo config; base64 creds.json`).
        let out = mask(&format!("config\n{wrapped}"), &long_forms);
        assert!(out.lines().skip(1).all(|l| l.contains("***")), "{out}");
        assert!(out.starts_with("config\n"), "{out}");
        // A short value split by a wrap into pieces under 16 characters each.
        let password = "correct-horse-batt3r".to_string();
        let encoded = STANDARD.encode(format!("{}{password}", "x".repeat(51)));
        let wrapped: String =
            encoded.as_bytes().chunks(76).map(|l| format!("{}\n", std::str::from_utf8(l).unwrap())).collect();
        let out = mask(&wrapped, &masked_forms(std::slice::from_ref(&password)));
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].ends_with("***") && lines[1].starts_with("***"), "{wrapped}\n->\n{out}");
        assert_eq!(lines[0].len(), 68 + 3, "the line's own part kept: {out}");
        // A log line alone: the end of one value and the start of another.
        let (a, b) = ("A".repeat(10) + &"0123456789abcdef".repeat(2), "B".repeat(10) + &"fedcba9876543210".repeat(2));
        let line = format!("{}mid{}", &a[a.len() - 20..], &b[..20]);
        assert_eq!(mask(&line, &[a.clone(), b.clone()]), "***mid***");
        // A short value is masked as itself only; its encodings are too common to mask.
        assert_eq!(forms.iter().filter(|f| f.contains("YWJj")).count(), 0);
        assert_eq!(masked("abc%20"), "***%20");
        assert_eq!(masked_forms(&[String::new()]), Vec::<String>::new());
    }

    #[test]
    fn masks_every_occurrence_longest_first() {
        let values = vec!["abc".to_string(), "abcdef".to_string(), String::new()];
        assert_eq!(mask("x abcdef y abc z", &values), "x *** y *** z");
        assert_eq!(mask("nothing here", &values), "nothing here");
    }
}
