//! Keyword filter plugin: masks or rejects messages containing configured words.
//!
//! Matching folds case (Unicode lowercase) and width (full-width ASCII forms and the
//! ideographic space become their half-width forms), so `ＢａｄＷｏｒｄ` matches `badword`;
//! CJK words match as written. One Aho-Corasick automaton per instance finds every word
//! in one pass over the text; a short list is first searched word by word, which proves
//! most messages clean more cheaply in WebAssembly.

use std::sync::OnceLock;

use aho_corasick::{AhoCorasick, MatchKind};
use im_plugin_sdk::screen::{BodyScreen, Rewrite, Verdict};
use im_plugin_sdk::{config, current};
use memchr::memmem::Finder;

/// Up to this many words, the (folded) text is first searched for each word on its own
/// (memchr's SIMD substring search, a few instructions a byte per word), which proves most
/// messages clean without the automaton. The automaton has no such skip in WebAssembly (its
/// SIMD prefilters are x86-64 and ARM only, and case folding rules out the others) and
/// steps through every byte, about 40 instructions each: past about eight words, searching
/// word by word costs more than that (`hook_bench`, docs/benchmarks.md). Six leaves room
/// for texts in which the words' first bytes come up more often than in the benchmark's.
const MAX_WORDS_SEARCHED_ONE_BY_ONE: usize = 6;

/// What to do with a message that contains a word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Mask,
    Reject,
}

/// The compiled word list.
pub struct WordFilter {
    automaton: Option<AhoCorasick>,
    /// The list's words, ASCII ones first, each searched on its own in folded text before
    /// the automaton runs; `None` when the list has more than
    /// [`MAX_WORDS_SEARCHED_ONE_BY_ONE`].
    short_list: Option<Vec<Finder<'static>>>,
    /// How many of `short_list`'s words are ASCII: only those can occur in ASCII text.
    ascii_words: usize,
    action: Action,
    mask: char,
}

/// Folds one character: full-width ASCII variants and the ideographic space to half-width,
/// then Unicode lowercase.
pub fn fold_char(c: char, out: &mut String) {
    match c {
        // Kept as they are without a search of the Unicode case tables per character.
        _ if folds_to_itself(c) => out.push(c),
        _ if c.is_ascii() => out.push(c.to_ascii_lowercase()),
        '\u{FF01}'..='\u{FF5E}' => {
            let half = char::from_u32(c as u32 - 0xFF01 + 0x21).unwrap_or(c);
            out.push(half.to_ascii_lowercase());
        }
        '\u{3000}' => out.push(' '),
        _ => out.extend(c.to_lowercase()),
    }
}

/// From CJK symbols and punctuation through the unified ideographs: no character here has
/// a lowercase form of its own (a test checks every one).
const CASELESS_CJK_FIRST: char = '\u{3001}';
const CASELESS_CJK_LAST: char = '\u{9FFF}';
/// Hangul syllables: no case either.
const HANGUL_FIRST: char = '\u{AC00}';
const HANGUL_LAST: char = '\u{D7A3}';

/// Whether folding leaves `c` as it is, as far as a quick look tells (`false` may be
/// wrong, `true` is not): ASCII other than capitals, and CJK punctuation, kana, ideographs
/// and Hangul, which have no case (a test checks every one against Unicode's tables).
fn folds_to_itself(c: char) -> bool {
    matches!(
        c,
        '\0'..='@'
            | '['..='\u{7F}'
            | CASELESS_CJK_FIRST..=CASELESS_CJK_LAST
            | HANGUL_FIRST..=HANGUL_LAST
    )
}

/// Folds a whole string.
pub fn fold(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    text.chars().for_each(|c| fold_char(c, &mut out));
    out
}

impl WordFilter {
    /// Builds the filter from a comma/newline separated word list.
    pub fn new(words: &str, action: Action, mask: char) -> Self {
        let words: Vec<String> = words
            .split([',', '\n'])
            .map(|w| fold(w.trim()))
            .filter(|w| !w.is_empty())
            .collect();
        let automaton = (!words.is_empty()).then(|| {
            AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostLongest)
                // ASCII text is searched as it is, without a folded copy.
                .ascii_case_insensitive(true)
                .build(&words)
                .expect("plain word lists always build")
        });
        let (ascii, other): (Vec<&String>, Vec<&String>) = words.iter().partition(|w| w.is_ascii());
        let short_list = (words.len() <= MAX_WORDS_SEARCHED_ONE_BY_ONE).then(|| {
            ascii
                .iter()
                .chain(&other)
                .map(|w| Finder::new(w.as_bytes()).into_owned())
                .collect()
        });
        Self {
            automaton,
            short_list,
            ascii_words: ascii.len(),
            action,
            mask,
        }
    }

    /// From the plugin's configuration (`words`, `action`, `mask`).
    pub fn from_config() -> Self {
        let action = if config::get_or("action", "mask") == "reject" {
            Action::Reject
        } else {
            Action::Mask
        };
        let mask = config::get_or("mask", "*").chars().next().unwrap_or('*');
        Self::new(&config::get_or("words", ""), action, mask)
    }

    /// When `body` is ASCII, tells whether it is proven clean (`Some(true)`: no word
    /// occurs) or may hold a word (`Some(false)`: [`Self::check`] it). `None`: this cannot
    /// tell. Most messages are clean ASCII, and this proves it on a lowercased copy on the
    /// stack, without the heap copy `check` lowercases into.
    pub fn clean_ascii(&self, body: &[u8]) -> Option<bool> {
        if self.automaton.is_none() {
            return Some(true);
        }
        let words = self.short_list.as_ref()?;
        if !body.is_ascii() {
            return None;
        }
        let words = &words[..self.ascii_words];
        let mut stack = [0u8; ASCII_COPY_ON_STACK];
        let may_hold_a_word = match stack.get_mut(..body.len()) {
            Some(lowercase) => {
                lowercase.copy_from_slice(body);
                lowercase.make_ascii_lowercase();
                occurs_in(words, lowercase)
            }
            None => occurs_in(words, &body.to_ascii_lowercase()),
        };
        Some(!may_hold_a_word)
    }

    /// The verdict for `text`: `None` when no word occurs, else the masked text or a
    /// rejection reason.
    pub fn check(&self, text: &str) -> Option<Result<String, String>> {
        let automaton = self.automaton.as_ref()?;
        if text.is_ascii() {
            if let Some(words) = &self.short_list {
                // Most messages hold no word: proven here, the automaton never runs.
                let lowercase = text.to_ascii_lowercase();
                if !occurs_in(&words[..self.ascii_words], lowercase.as_bytes()) {
                    return None;
                }
            }
            return self.check_ascii(automaton, text);
        }
        // Proven clean on a plain fold first: the fold that tracks where each byte came
        // from is needed only to mask, when a word occurs.
        let folded = if text.chars().all(folds_to_itself) {
            // Chinese text with digits and punctuation, say: no copy to fold.
            std::borrow::Cow::Borrowed(text)
        } else {
            std::borrow::Cow::Owned(fold(text))
        };
        let maybe = match &self.short_list {
            Some(words) => occurs_in(words, folded.as_bytes()),
            None => automaton.is_match(folded.as_ref()),
        };
        if !maybe {
            return None;
        }
        // Fold while remembering, for each folded byte, which original character it came from.
        let mut folded = String::with_capacity(text.len());
        let mut origin = Vec::with_capacity(text.len());
        for (index, c) in text.chars().enumerate() {
            let before = folded.len();
            fold_char(c, &mut folded);
            origin.extend(std::iter::repeat_n(index, folded.len() - before));
        }
        let mut masked = vec![false; text.chars().count()];
        let mut found = false;
        for m in automaton.find_iter(&folded) {
            found = true;
            if self.action == Action::Reject {
                return Some(Err("message contains a blocked word".to_owned()));
            }
            for flag in &mut masked[origin[m.start()]..=origin[m.end() - 1]] {
                *flag = true;
            }
        }
        if !found {
            return None;
        }
        Some(Ok(text
            .chars()
            .zip(masked)
            .map(|(c, m)| if m { self.mask } else { c })
            .collect()))
    }
}

impl WordFilter {
    /// ASCII text needs no folding (the automaton ignores ASCII case): search it in place,
    /// and mask bytes, which are characters here.
    fn check_ascii(&self, automaton: &AhoCorasick, text: &str) -> Option<Result<String, String>> {
        let mut matches = automaton.find_iter(text).peekable();
        matches.peek()?;
        if self.action == Action::Reject {
            return Some(Err("message contains a blocked word".to_owned()));
        }
        let mut masked: Vec<char> = text.chars().collect();
        for m in matches {
            masked[m.start()..m.end()].fill(self.mask);
        }
        Some(Ok(masked.into_iter().collect()))
    }
}

/// Longest ASCII body [`WordFilter::clean_ascii`] lowercases on the stack (most chat
/// messages are shorter).
const ASCII_COPY_ON_STACK: usize = 512;

/// Whether any of `words` occurs in `text`.
fn occurs_in(words: &[Finder<'_>], text: &[u8]) -> bool {
    words.iter().any(|w| w.find(text).is_some())
}

fn filter() -> &'static WordFilter {
    static FILTER: OnceLock<WordFilter> = OnceLock::new();
    FILTER.get_or_init(WordFilter::from_config)
}

struct KeywordFilter;

impl BodyScreen for KeywordFilter {
    fn screen(body: Vec<u8>) -> Verdict {
        // The body first: most messages hold no word, and their verdict does not depend on
        // the content type, so they cost no host call at all.
        if filter().clean_ascii(&body) == Some(true) {
            return Verdict::Allow;
        }
        let Ok(text) = std::str::from_utf8(&body) else {
            return Verdict::Allow;
        };
        let Some(found) = filter().check(text) else {
            return Verdict::Allow;
        };
        // Only text is filtered: a non-text body that happens to be valid UTF-8 passes.
        let content_type = current::content_type().unwrap_or_default();
        if !(content_type.is_empty() || content_type.starts_with("text/")) {
            return Verdict::Allow;
        }
        match found {
            Err(reason) => Verdict::Reject(reason),
            Ok(masked) => Verdict::Modify(Rewrite {
                body: masked.into_bytes(),
                content_type,
            }),
        }
    }
}

im_plugin_sdk::export_body_screen!(KeywordFilter);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_case_and_width_variants_and_cjk() {
        let f = WordFilter::new("badword, 诈骗\nscam", Action::Mask, '*');
        assert_eq!(f.check("hello"), None);
        assert_eq!(f.check("a BadWord here"), Some(Ok("a ******* here".into())));
        assert_eq!(f.check("ＢＡＤｗｏｒｄ!"), Some(Ok("*******!".into())));
        assert_eq!(f.check("这是诈骗信息"), Some(Ok("这是**信息".into())));
        assert_eq!(f.check("scam scam"), Some(Ok("**** ****".into())));
    }

    #[test]
    fn ascii_bodies_are_proven_clean_and_others_left_to_check() {
        let f = WordFilter::new("badword, 诈骗\nscam", Action::Mask, '*');
        assert_eq!(f.clean_ascii(b"Hello THERE"), Some(true));
        assert_eq!(f.clean_ascii(b"a BadWord here"), Some(false));
        assert_eq!(f.clean_ascii("这是诈骗信息".as_bytes()), None);
        // Longer than the stack copy: lowercased on the heap, same answers.
        let long_clean = "Hello THERE ".repeat(ASCII_COPY_ON_STACK / 8);
        assert_eq!(f.clean_ascii(long_clean.as_bytes()), Some(true));
        let long_dirty = format!("{long_clean}SCAM");
        assert_eq!(f.clean_ascii(long_dirty.as_bytes()), Some(false));
        let nothing = WordFilter::new("", Action::Mask, '*');
        assert_eq!(nothing.clean_ascii(b"SCAM"), Some(true));
        // A list too long to search word by word leaves every body to `check`.
        let long: Vec<String> = (0..=MAX_WORDS_SEARCHED_ONE_BY_ONE)
            .map(|n| format!("w{n}x"))
            .collect();
        let long = WordFilter::new(&long.join(","), Action::Mask, '*');
        assert_eq!(long.clean_ascii(b"W1X"), None);
    }

    #[test]
    fn reject_mode_refuses() {
        let f = WordFilter::new("scam", Action::Reject, '*');
        assert_eq!(
            f.check("no SCAM"),
            Some(Err("message contains a blocked word".into()))
        );
        assert_eq!(f.check("fine"), None);
    }

    #[test]
    fn short_and_long_word_lists_find_the_same_words() {
        let words = [
            "badword", "scam", "fraud", "spam", "idiot", "moron", "casino", "lottery",
        ];
        let texts = [
            "the quick brown fox jumps over the lazy dog",
            "Win the LOTTERY at our Casino",
            "no SCAM here, only spam: a BadWord",
            "scamming spammers",
            "",
        ];
        for count in 1..=words.len() {
            let list = words[..count].join(",");
            let filter = WordFilter::new(&list, Action::Mask, '*');
            // Searched word by word first, or by the automaton alone.
            assert_eq!(
                filter.short_list.is_some(),
                count <= MAX_WORDS_SEARCHED_ONE_BY_ONE
            );
            for text in texts {
                let mut masked = text.to_owned();
                for word in &words[..count] {
                    let lowercase = masked.to_ascii_lowercase();
                    for (at, _) in lowercase.match_indices(word) {
                        masked.replace_range(at..at + word.len(), &"*".repeat(word.len()));
                    }
                }
                let expected = (masked != text).then_some(Ok(masked));
                assert_eq!(filter.check(text), expected, "{count} words, {text:?}");
            }
        }
    }

    #[test]
    fn short_and_long_lists_mask_mixed_text_alike() {
        let words = "诈骗, scam, 전화, ＦＲＡＵＤ, ÉTÉ, a, b, c";
        let short = WordFilter::new(
            &words.split(", ").take(5).collect::<Vec<_>>().join(","),
            Action::Mask,
            '*',
        );
        let long = WordFilter::new(words, Action::Mask, '*');
        assert!(short.short_list.is_some() && long.short_list.is_none());
        for text in [
            "这是诈骗信息",
            "Ｓｃａｍ 전화 été",
            "no words: 天气很好",
            "fraud 诈骗",
        ] {
            let expected = match text {
                "这是诈骗信息" => Some(Ok("这是**信息".to_owned())),
                "Ｓｃａｍ 전화 été" => Some(Ok("**** ** ***".to_owned())),
                "no words: 天气很好" => None,
                _ => Some(Ok("***** **".to_owned())),
            };
            assert_eq!(short.check(text), expected, "short list, {text:?}");
        }
        // The long list also holds single letters: only its own verdict is compared.
        assert_eq!(long.check("天气很好"), None);
        assert_eq!(
            long.check("这是诈骗信息"),
            Some(Ok("这是**信息".to_owned()))
        );
    }

    #[test]
    fn characters_said_to_fold_to_themselves_have_no_case() {
        let kept = (0..=0x10FFFF)
            .filter_map(char::from_u32)
            .filter(|&c| folds_to_itself(c));
        for c in kept {
            // Unicode's own answer, not the shortcut's: no lowercase form, no width form.
            assert!(c.to_lowercase().eq([c]), "{c:?} has a lowercase form");
            assert!(!matches!(c, '\u{3000}' | '\u{FF01}'..='\u{FF5E}'), "{c:?}");
            let mut folded = String::new();
            fold_char(c, &mut folded);
            assert_eq!(folded, c.to_string(), "{c:?}");
        }
        for c in [
            CASELESS_CJK_FIRST,
            CASELESS_CJK_LAST,
            HANGUL_FIRST,
            HANGUL_LAST,
        ] {
            assert!(folds_to_itself(c), "{c:?}");
        }
    }

    #[test]
    fn ascii_text_never_holds_a_cjk_word() {
        let f = WordFilter::new("诈骗", Action::Reject, '*');
        assert_eq!(f.check("zha pian"), None);
        assert!(f.check("这是诈骗").is_some());
    }

    #[test]
    fn empty_word_list_passes_everything() {
        assert_eq!(
            WordFilter::new(" , ", Action::Mask, '*').check("anything"),
            None
        );
    }
}
