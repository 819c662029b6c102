//! Parsing a large file piece by piece: the settings first, then each campaign on its own.
//!
//! The toml parser keeps the tokens, events and document tree of the whole text while it
//! parses, about 20 times the file size. Parsed one campaign at a time, a file of 100,000
//! campaigns needs a small fraction of that. This path is taken only for a file whose
//! settings come before its first `[[campaigns]]` table and whose pieces all parse and
//! deserialize without an error. Any other file goes through the whole-document parse, so
//! that errors are reported exactly as before.

use std::convert::identity;
use std::ops::Range;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use toml::de::DeTable;
use toml::Spanned;

use super::error::Source;
use super::file::{CampaignSection, FileConfig, KeySection, RateLimitSection};
use super::parallel::map_chunks;
use super::validate::{check_campaign, CheckedCampaign};
use crate::table::SharedCampaigns;

/// A file cut at its top-level table headers.
#[derive(Debug, PartialEq, Eq)]
struct Pieces {
    /// The text before the first `[[campaigns]]` header.
    settings: Range<usize>,
    /// One range for each campaign, from its `[[campaigns]]` header to the next one.
    campaigns: Vec<Range<usize>>,
}

/// The file shape of one campaign's piece.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CampaignPiece {
    campaigns: Vec<Spanned<CampaignSection>>,
}

/// Parses `text` piece by piece, or returns `None` when the file needs the whole-document
/// parse: its shape is not settings then campaigns, or some piece has an error. Each
/// campaign is checked on its own as soon as its piece is parsed, in the same thread,
/// and its parsed text is dropped there. The file's `campaigns` stays empty.
pub(super) fn parse(
    text: &str,
    source: &Source,
    shared: Option<&SharedCampaigns<'_>>,
) -> Option<(FileConfig, Vec<CheckedCampaign>)> {
    let pieces = split(text)?;
    let file: FileConfig = parse_piece(&text[pieces.settings.clone()])?;
    if !file.campaigns.is_empty() {
        // Campaigns written another way, such as `campaigns = [...]`.
        return None;
    }
    let parsed = map_chunks(&pieces.campaigns, MIN_PIECES_PER_THREAD, |first, chunk| {
        parse_campaign_pieces(text, first, chunk, source, shared)
    });
    let mut campaigns = Vec::with_capacity(pieces.campaigns.len());
    for chunk in parsed {
        campaigns.extend(chunk?);
    }
    Some((file, campaigns))
}

/// The minimum number of campaigns for each parser thread.
const MIN_PIECES_PER_THREAD: usize = 2_000;

/// Parses the pieces of the campaigns from index `first` on.
fn parse_campaign_pieces(
    text: &str,
    first: usize,
    ranges: &[Range<usize>],
    source: &Source,
    shared: Option<&SharedCampaigns<'_>>,
) -> Option<Vec<CheckedCampaign>> {
    let mut campaigns = Vec::with_capacity(ranges.len());
    for (offset, range) in ranges.iter().enumerate() {
        let piece: CampaignPiece = parse_piece(&text[range.clone()])?;
        let [campaign] = <[_; 1]>::try_from(piece.campaigns).ok()?;
        let section = shift_campaign(campaign.into_inner(), range.start);
        campaigns.push(check_campaign(&section, first + offset, source, shared));
    }
    Some(campaigns)
}

/// Parses one piece as a document of its own. Returns `None` on a syntax error, an unknown
/// key or a value of the wrong type: every struct of the file denies unknown fields, so
/// deserialization rejects the keys that `remove_unknown_keys` would report.
fn parse_piece<T: DeserializeOwned>(text: &str) -> Option<T> {
    let root = DeTable::parse(text).ok()?;
    T::deserialize(toml::de::Deserializer::from(root)).ok()
}

/// Finds the top-level table headers of `text`: the lines that start with `[`.
///
/// A line inside a multi-line string or array can look like a header too. Cutting there
/// leaves the piece before the cut with an unclosed string or array, which fails to
/// parse, and the whole file then goes through the whole-document parse. So a wrong cut
/// costs time but never changes the result, and the scan needs no lexer.
fn split(text: &str) -> Option<Pieces> {
    let mut first_campaign: Option<usize> = None;
    let mut campaigns: Vec<Range<usize>> = Vec::new();
    let mut line_start = 0;
    let line_ends = memchr::memchr_iter(b'\n', text.as_bytes()).map(|newline| newline + 1);
    for line_end in line_ends.chain(std::iter::once(text.len())) {
        let line = &text[line_start..line_end];
        let indented = line.trim_start_matches([' ', '\t']);
        let start = line_start + (line.len() - indented.len());
        line_start = line_end;
        if !indented.starts_with('[') {
            continue;
        }
        // A `#` ends the header; `classify` declines quoted keys, which could contain one.
        let header = indented.split('#').next().unwrap_or_default().trim_end();
        match classify(header)? {
            Header::Campaign => {
                if let Some(last) = campaigns.last_mut() {
                    last.end = start;
                }
                first_campaign.get_or_insert(start);
                campaigns.push(start..text.len());
            }
            Header::CampaignPart if first_campaign.is_some() => {}
            Header::CampaignPart => return None,
            Header::Other if first_campaign.is_some() => return None,
            Header::Other => {}
        }
    }
    Some(Pieces {
        settings: 0..first_campaign.unwrap_or(text.len()),
        campaigns,
    })
}

/// A top-level table header, by what it opens.
enum Header {
    /// `[[campaigns]]`: a new campaign.
    Campaign,
    /// A table inside the current campaign, such as `[[campaigns.keys]]`.
    CampaignPart,
    Other,
}

/// Classifies a header line without its comment. Returns `None` for a header this
/// splitter does not read, such as one with quoted keys, which the whole-document parse
/// handles instead.
fn classify(header: &str) -> Option<Header> {
    let (inner, array) = match header.strip_prefix("[[") {
        Some(rest) => (rest.strip_suffix("]]")?, true),
        None => (header.strip_prefix('[')?.strip_suffix(']')?, false),
    };
    if inner.contains(['"', '\'', '[', ']']) {
        return None;
    }
    let mut names = inner.split('.').map(str::trim);
    let first = names.next()?;
    let rest = names.count();
    Some(match (first, rest, array) {
        ("campaigns", 0, true) => Header::Campaign,
        ("campaigns", 0, false) => Header::Other,
        ("campaigns", _, _) => Header::CampaignPart,
        _ => Header::Other,
    })
}

/// Moves a span that is relative to a piece to the position in the whole file.
fn shift<T>(value: Spanned<T>, offset: usize, inner: impl FnOnce(T) -> T) -> Spanned<T> {
    let span = value.span();
    Spanned::new(
        span.start + offset..span.end + offset,
        inner(value.into_inner()),
    )
}

fn shift_campaign(campaign: CampaignSection, offset: usize) -> CampaignSection {
    CampaignSection {
        id: shift(campaign.id, offset, identity),
        allowed_ips: campaign
            .allowed_ips
            .into_iter()
            .map(|ip| shift(ip, offset, identity))
            .collect(),
        allow_any_ip: campaign.allow_any_ip,
        rate_limit: campaign
            .rate_limit
            .map(|limit| shift(limit, offset, |limit| shift_rate_limit(limit, offset))),
        keys: campaign
            .keys
            .into_iter()
            .map(|key| shift(key, offset, |key| shift_key(key, offset)))
            .collect(),
    }
}

fn shift_rate_limit(limit: RateLimitSection, offset: usize) -> RateLimitSection {
    RateLimitSection {
        requests: shift(limit.requests, offset, identity),
        per_seconds: shift(limit.per_seconds, offset, identity),
    }
}

fn shift_key(key: KeySection, offset: usize) -> KeySection {
    KeySection {
        id: shift(key.id, offset, identity),
        sha256: shift(key.sha256, offset, identity),
        expires_at: key
            .expires_at
            .map(|expires| shift(expires, offset, identity)),
    }
}

#[cfg(test)]
mod tests {
    use super::super::error::Report;
    use super::super::validate::check_campaigns;
    use super::*;

    /// Parses `text` as one document and checks its campaigns the way the pieces do.
    fn whole_document(text: &str) -> (FileConfig, Vec<CheckedCampaign>) {
        let source = Source::new("test.toml", text);
        let mut report = Report::new(&source);
        let mut file = super::super::parse_document(text, &mut report).unwrap();
        let campaigns = check_campaigns(&file.campaigns, &source, None);
        file.campaigns = Vec::new();
        (file, campaigns)
    }

    fn pieces(text: &str) -> Option<(FileConfig, Vec<CheckedCampaign>)> {
        parse(text, &Source::new("test.toml", text), None)
    }

    /// Settings, then campaigns with errors that only validation finds, written in the
    /// forms TOML allows: tables, inline tables, dotted tables, comments.
    const CAMPAIGNS: &str = r#"environment = "test" # comment with [[campaigns]]
[listen]
proxy = [
  "127.0.0.1:8080",
]
[upstream]
address = "127.0.0.1:9000"
[routes]
campaign_paths = ["/api/v2/campaigns/{campaign}"]

[[campaigns]]
id = "campaign_a"
allowed_ips = ["203.0.113.0/24", "10.0.0.01"]
[campaigns.rate_limit]
requests = 0
per_seconds = 1
[[campaigns.keys]]
id = "primary"
sha256 = "1111111111111111111111111111111111111111111111111111111111111111"
expires_at = "2027-13-30T00:00:00Z"

[[campaigns]]
id = "campaign_a"
allowed_ips = []
keys = [{ id = "k", sha256 = "1111111111111111111111111111111111111111111111111111111111111111" }, { id = "k", sha256 = "ABC" }]
"#;

    #[test]
    fn pieces_match_whole_document() {
        let whole = whole_document(CAMPAIGNS);
        let pieces = pieces(CAMPAIGNS).expect("the pieces parse");
        assert_eq!(format!("{pieces:?}"), format!("{whole:?}"));
        let errors = super::super::parse("test.toml", CAMPAIGNS).unwrap_err().0;
        assert!(errors.len() >= 6, "{errors:?}");
    }

    /// Builds a file with enough campaigns for several parser threads.
    fn many_campaigns(count: usize) -> String {
        let settings = &CAMPAIGNS[..=CAMPAIGNS.find("\n[[campaigns]]").unwrap()];
        let mut text = settings.to_owned();
        for index in 0..count {
            text.push_str(&format!(
                "[[campaigns]]\nid = \"c{index}\"\nallowed_ips = [\"10.0.{}.{}\"]\n\
                 [[campaigns.keys]]\nid = \"k\"\nsha256 = \"{index:064x}\"\n",
                index / 256,
                index % 256
            ));
        }
        text
    }

    #[test]
    fn threads_keep_campaign_order() {
        let text = many_campaigns(3 * MIN_PIECES_PER_THREAD + 1);
        let whole = whole_document(&text);
        let pieces = pieces(&text).expect("the pieces parse");
        assert_eq!(pieces.1.len(), 3 * MIN_PIECES_PER_THREAD + 1);
        assert_eq!(format!("{pieces:?}"), format!("{whole:?}"));
    }

    #[test]
    fn error_in_last_thread_declines() {
        let text = many_campaigns(3 * MIN_PIECES_PER_THREAD) + "[[campaigns]]\nid = 1\n";
        assert!(pieces(&text).is_none());
    }

    #[test]
    fn pieces_decline_errors() {
        for (from, to) in [
            ("requests = 0", "requests = \"0\""),
            ("requests = 0", "requests = 0\nburst = 1"),
            ("per_seconds = 1", "per_seconds = "),
            ("allowed_ips = []", "allowed_ips = []\nparsed_allowlist = 1"),
        ] {
            let text = CAMPAIGNS.replacen(from, to, 1);
            assert!(pieces(&text).is_none(), "{to}");
        }
    }

    #[test]
    fn split_settings_then_campaigns() {
        let text = "environment = \"test\"\n[listen]\nproxy = [\n  \"127.0.0.1:1\",\n]\n\
                    [[campaigns]]\nid = \"a\"\n[[campaigns.keys]]\nid = \"k\"\n\
                    [campaigns.rate_limit] # per campaign\nrequests = 1\n\
                    [[ campaigns ]]\nid = \"b\"\n";
        let pieces = split(text).unwrap();
        let first = text.find("[[campaigns]]").unwrap();
        let second = text.find("[[ campaigns ]]").unwrap();
        assert_eq!(pieces.settings, 0..first);
        assert_eq!(pieces.campaigns, vec![first..second, second..text.len()]);
    }

    #[test]
    fn headers_inside_values_never_change_the_result() {
        let first_campaign = CAMPAIGNS.find("\n[[campaigns]]").unwrap() + 1;
        for value in [
            "note = \"\"\"\n[[campaigns]]\nid = \"x\"\n\"\"\"\n",
            "note = '''\n[[campaigns]]\n'''\n",
            "note = [\n[1],\n]\n",
            "note = \"\"\"\n[campaigns.keys]\n\"\"\"\n",
        ] {
            // In a campaign or in the settings, `note` is an unknown key, and the text may
            // look like a header to the scan. Only the whole-document parse may decide.
            let in_campaign = CAMPAIGNS.replacen(
                "id = \"campaign_a\"\n",
                &format!("id = \"campaign_a\"\n{value}"),
                1,
            );
            let in_settings = format!(
                "{}{value}{}",
                &CAMPAIGNS[..first_campaign],
                &CAMPAIGNS[first_campaign..]
            );
            for text in [in_campaign, in_settings] {
                assert!(pieces(&text).is_none(), "{text}");
                assert!(super::super::parse("test.toml", &text)
                    .unwrap_err()
                    .0
                    .iter()
                    .any(|error| error.field.ends_with("note")));
            }
        }
    }

    #[test]
    fn split_declines_other_shapes() {
        for text in [
            "[[campaigns]]\nid = \"a\"\n[log]\naccess = false\n",
            "[campaigns.keys]\nid = \"a\"\n",
            "[[\"campaigns\"]]\nid = \"a\"\n",
        ] {
            assert_eq!(split(text), None, "{text}");
        }
    }
}
