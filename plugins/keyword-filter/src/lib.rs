//! Keyword filter plugin: masks or rejects messages containing configured words.
//!
//! Matching folds case (Unicode lowercase) and width (full-width ASCII forms and the
//! ideographic space become their half-width forms), so `ＢａｄＷｏｒｄ` matches `badword`;
//! CJK words match as written. One Aho-Corasick automaton per instance finds every word
//! in one pass over the text.

use std::sync::OnceLock;

use aho_corasick::{AhoCorasick, MatchKind};
use im_plugin_sdk::filter::{MessageFilter, Rewrite, Verdict};
use im_plugin_sdk::{CallContext, Message, config};
use memchr::memmem::Finder;

/// Up to this many ASCII words, ASCII text is first searched for each word on its own
/// (memchr's SIMD substring search, a few instructions a byte per word), which proves most
/// messages clean without the automaton. The automaton has no such skip in WebAssembly (its
/// SIMD prefilters are x86-64 and ARM only, and case folding rules out the others) and
/// steps through every byte, about 40 instructions each: past about eight words, searching
/// word by word costs more than that (`hook_bench`, docs/benchmarks.md).
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
    /// The list's ASCII words, each searched on its own in lowercased ASCII text before the
    /// automaton runs; `None` when the list has more than [`MAX_WORDS_SEARCHED_ONE_BY_ONE`].
    ascii_words: Option<Vec<Finder<'static>>>,
    action: Action,
    mask: char,
}

/// Folds one character: full-width ASCII variants and the ideographic space to half-width,
/// then Unicode lowercase.
pub fn fold_char(c: char, out: &mut String) {
    let half = match c {
        '\u{FF01}'..='\u{FF5E}' => char::from_u32(c as u32 - 0xFF01 + 0x21).unwrap_or(c),
        '\u{3000}' => ' ',
        _ => c,
    };
    out.extend(half.to_lowercase());
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
        let ascii_words: Vec<Finder<'static>> = words
            .iter()
            .filter(|w| w.is_ascii())
            .map(|w| Finder::new(w.as_bytes()).into_owned())
            .collect();
        Self {
            automaton,
            ascii_words: (ascii_words.len() <= MAX_WORDS_SEARCHED_ONE_BY_ONE)
                .then_some(ascii_words),
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

    /// The verdict for `text`: `None` when no word occurs, else the masked text or a
    /// rejection reason.
    pub fn check(&self, text: &str) -> Option<Result<String, String>> {
        let automaton = self.automaton.as_ref()?;
        if text.is_ascii() {
            if let Some(words) = &self.ascii_words {
                // Most messages hold no word: proven here, the automaton never runs.
                let lowercase = text.to_ascii_lowercase();
                if words.iter().all(|w| w.find(lowercase.as_bytes()).is_none()) {
                    return None;
                }
            }
            return self.check_ascii(automaton, text);
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

fn filter() -> &'static WordFilter {
    static FILTER: OnceLock<WordFilter> = OnceLock::new();
    FILTER.get_or_init(WordFilter::from_config)
}

struct KeywordFilter;

impl MessageFilter for KeywordFilter {
    fn filter(_ctx: &CallContext, message: &Message) -> Verdict {
        // The body first: most messages hold no word, and their verdict does not depend on
        // the content type, so they cost one host call instead of two.
        let body = message.body();
        let Ok(text) = std::str::from_utf8(&body) else {
            return Verdict::Allow;
        };
        let Some(found) = filter().check(text) else {
            return Verdict::Allow;
        };
        // Only text is filtered: a non-text body that happens to be valid UTF-8 passes.
        let content_type = message.content_type();
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

im_plugin_sdk::export_message_filter!(KeywordFilter);

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
                filter.ascii_words.is_some(),
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
