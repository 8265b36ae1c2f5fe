//! NATS subject syntax: the checks for published subjects and subscription patterns, and the
//! plain token-by-token matcher that the pattern index is measured against.

/// At most this many `.`-separated tokens in a subject or pattern.
pub const MAX_TOKENS: usize = 16;
/// At most this many bytes in a subject or pattern, separators included.
pub const MAX_BYTES: usize = 255;

/// Matches exactly one token.
pub(crate) const SINGLE_WILDCARD: &str = "*";
/// Matches one or more tokens; only as the last token of a pattern.
pub(crate) const TAIL_WILDCARD: &str = ">";
pub(crate) const SEPARATOR: char = '.';

/// Why a subject or pattern was refused. Positions count tokens from 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    #[error("it is empty")]
    Empty,

    #[error("longer than {max} bytes (it has {0})", max = MAX_BYTES)]
    TooLong(usize),

    #[error("more than {max} tokens (it has {0})", max = MAX_TOKENS)]
    TooManyTokens(usize),

    #[error("empty token at position {0}")]
    EmptyToken(usize),

    #[error("token {position} contains a space or non-printable character ({character:?})")]
    NonPrintable { position: usize, character: char },

    #[error("token {0:?}: a wildcard must be a whole token")]
    PartialWildcard(String),

    #[error("'>' must be the last token (found at position {0})")]
    TailWildcardNotLast(usize),

    #[error("wildcards are not allowed in a published subject (token {position} is {token:?})")]
    WildcardInSubject { position: usize, token: String },
}

/// Checks a literal subject, the kind a message is published to.
pub fn check_subject(subject: &str) -> Result<(), SubjectError> {
    check(subject, Kind::Subject)
}

/// Checks a subscription pattern, which may use `*` and a trailing `>`.
pub fn check_pattern(pattern: &str) -> Result<(), SubjectError> {
    check(pattern, Kind::Pattern)
}

#[cfg(test)]
/// Whether `pattern` matches `subject`, walking both token by token. Both must already be valid;
/// this is the reference the index is tested against, not the fast path.
pub fn naive_matches(pattern: &str, subject: &str) -> bool {
    let mut subject_tokens = subject.split(SEPARATOR);
    for pattern_token in pattern.split(SEPARATOR) {
        let Some(subject_token) = subject_tokens.next() else {
            return false;
        };
        match pattern_token {
            // '>' is last and has just taken one token; it takes the rest too.
            TAIL_WILDCARD => return true,
            SINGLE_WILDCARD => {}
            literal if literal == subject_token => {}
            _ => return false,
        }
    }
    subject_tokens.next().is_none()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Subject,
    Pattern,
}

fn check(text: &str, kind: Kind) -> Result<(), SubjectError> {
    let token_count = check_size(text)?;
    for (index, token) in text.split(SEPARATOR).enumerate() {
        let position = index + 1;
        check_token_characters(token, position)?;
        match kind {
            Kind::Subject => check_literal_token(token, position)?,
            Kind::Pattern => check_pattern_token(token, position, position == token_count)?,
        }
    }
    Ok(())
}

/// The whole-string limits, checked before any token so that a huge input fails fast.
/// Returns the number of tokens.
fn check_size(text: &str) -> Result<usize, SubjectError> {
    if text.is_empty() {
        return Err(SubjectError::Empty);
    }
    if text.len() > MAX_BYTES {
        return Err(SubjectError::TooLong(text.len()));
    }
    let token_count = text.split(SEPARATOR).count();
    if token_count > MAX_TOKENS {
        return Err(SubjectError::TooManyTokens(token_count));
    }
    Ok(token_count)
}

fn check_token_characters(token: &str, position: usize) -> Result<(), SubjectError> {
    if token.is_empty() {
        return Err(SubjectError::EmptyToken(position));
    }
    match token.chars().find(|&c| !is_printable_ascii(c)) {
        Some(character) => Err(SubjectError::NonPrintable {
            position,
            character,
        }),
        None => Ok(()),
    }
}

fn check_literal_token(token: &str, position: usize) -> Result<(), SubjectError> {
    if token.contains(is_wildcard_char) {
        return Err(SubjectError::WildcardInSubject {
            position,
            token: token.to_string(),
        });
    }
    Ok(())
}

fn check_pattern_token(token: &str, position: usize, is_last: bool) -> Result<(), SubjectError> {
    match token {
        SINGLE_WILDCARD => Ok(()),
        TAIL_WILDCARD if is_last => Ok(()),
        TAIL_WILDCARD => Err(SubjectError::TailWildcardNotLast(position)),
        _ if token.contains(is_wildcard_char) => {
            Err(SubjectError::PartialWildcard(token.to_string()))
        }
        _ => Ok(()),
    }
}

/// 0x21..=0x7E: no space, no control characters, nothing outside ASCII.
fn is_printable_ascii(c: char) -> bool {
    c.is_ascii_graphic()
}

fn is_wildcard_char(c: char) -> bool {
    c == '*' || c == '>'
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `count` one-letter tokens: "a.a.a…".
    fn tokens(count: usize) -> String {
        vec!["a"; count].join(".")
    }

    /// A single token of exactly `len` bytes.
    fn bytes(len: usize) -> String {
        "a".repeat(len)
    }

    /// A two-token string of exactly `len` bytes, so only the byte limit is in play.
    fn dotted_bytes(len: usize) -> String {
        format!("a.{}", bytes(len - 2))
    }

    fn non_printable(position: usize, character: char) -> SubjectError {
        SubjectError::NonPrintable {
            position,
            character,
        }
    }

    fn wildcard_in_subject(position: usize, token: &str) -> SubjectError {
        SubjectError::WildcardInSubject {
            position,
            token: token.to_string(),
        }
    }

    fn partial(token: &str) -> SubjectError {
        SubjectError::PartialWildcard(token.to_string())
    }

    /// Forms that are invalid in a pattern and a subject alike, for the same reason.
    fn invalid_everywhere() -> Vec<(String, SubjectError)> {
        vec![
            (String::new(), SubjectError::Empty),
            (".".into(), SubjectError::EmptyToken(1)),
            (".a".into(), SubjectError::EmptyToken(1)),
            ("a.".into(), SubjectError::EmptyToken(2)),
            ("a..b".into(), SubjectError::EmptyToken(2)),
            (tokens(17), SubjectError::TooManyTokens(17)),
            (bytes(256), SubjectError::TooLong(256)),
            (dotted_bytes(256), SubjectError::TooLong(256)),
            ("a.b c".into(), non_printable(2, ' ')),
            (" ".into(), non_printable(1, ' ')),
            ("a.b\tc".into(), non_printable(2, '\t')),
            ("a.\u{7f}".into(), non_printable(2, '\u{7f}')),
            ("a.\n".into(), non_printable(2, '\n')),
            ("caf\u{e9}.b".into(), non_printable(1, '\u{e9}')),
            ("a.\u{1F600}".into(), non_printable(2, '\u{1F600}')),
        ]
    }

    /// Literal forms that are valid as a subject and, having no wildcard, as a pattern.
    fn valid_literals() -> Vec<String> {
        vec![
            "a".into(),
            "a.b.c".into(),
            "A.b".into(),
            "orders.eu-west.created_v2".into(),
            "!#$%&'()+,-/:;<=?@[]^`{|}~\"\\".into(),
            "12.34".into(),
            tokens(16),
            bytes(255),
            dotted_bytes(255),
        ]
    }

    #[test]
    fn check_subject_table() {
        for subject in valid_literals() {
            assert_eq!(check_subject(&subject), Ok(()), "{subject:?}");
        }
        let subject_only = [
            ("*", wildcard_in_subject(1, "*")),
            (">", wildcard_in_subject(1, ">")),
            ("a.*", wildcard_in_subject(2, "*")),
            ("a.>", wildcard_in_subject(2, ">")),
            ("a*b", wildcard_in_subject(1, "a*b")),
            ("a.b>", wildcard_in_subject(2, "b>")),
            ("*.*", wildcard_in_subject(1, "*")),
        ];
        let invalid = invalid_everywhere()
            .into_iter()
            .chain(subject_only.map(|(s, e)| (s.to_string(), e)));
        for (subject, expected) in invalid {
            assert_eq!(check_subject(&subject), Err(expected), "{subject:?}");
        }
    }

    #[test]
    fn check_pattern_table() {
        let pattern_only = [
            ">", "*", "*.*", "a.*.c", "a.>", "*.>", "*.*.>", "a.*", "*.b",
        ];
        let valid = valid_literals()
            .into_iter()
            .chain(pattern_only.map(String::from))
            .chain([vec!["*"; 16].join("."), format!("{}.>", tokens(15))]);
        for pattern in valid {
            assert_eq!(check_pattern(&pattern), Ok(()), "{pattern:?}");
        }
        let wildcard_misuse = [
            ("a*", partial("a*")),
            ("*a", partial("*a")),
            ("a.b>", partial("b>")),
            ("a*b", partial("a*b")),
            ("**", partial("**")),
            (">>", partial(">>")),
            ("a.>.b", SubjectError::TailWildcardNotLast(2)),
            (">.a", SubjectError::TailWildcardNotLast(1)),
            (">.>", SubjectError::TailWildcardNotLast(1)),
        ];
        let invalid = invalid_everywhere()
            .into_iter()
            .chain(wildcard_misuse.map(|(p, e)| (p.to_string(), e)))
            .chain([(format!("{}.>", tokens(16)), SubjectError::TooManyTokens(17))]);
        for (pattern, expected) in invalid {
            assert_eq!(check_pattern(&pattern), Err(expected), "{pattern:?}");
        }
    }

    #[test]
    fn error_messages_name_the_problem() {
        let cases = [
            (SubjectError::Empty, "it is empty"),
            (
                SubjectError::TooLong(256),
                "longer than 255 bytes (it has 256)",
            ),
            (
                SubjectError::TooManyTokens(17),
                "more than 16 tokens (it has 17)",
            ),
            (SubjectError::EmptyToken(2), "empty token at position 2"),
            (
                non_printable(2, '\t'),
                "token 2 contains a space or non-printable character ('\\t')",
            ),
            (
                partial("a*"),
                "token \"a*\": a wildcard must be a whole token",
            ),
            (
                SubjectError::TailWildcardNotLast(1),
                "'>' must be the last token (found at position 1)",
            ),
            (
                wildcard_in_subject(2, "*"),
                "wildcards are not allowed in a published subject (token 2 is \"*\")",
            ),
        ];
        for (error, message) in cases {
            assert_eq!(error.to_string(), message);
        }
    }

    /// (pattern, subject, matches?) shared with the index tests, so both matchers agree on it.
    pub(crate) const MATCH_CASES: &[(&str, &str, bool)] = &[
        ("a.>", "a", false),
        ("a.>", "a.b", true),
        ("a.>", "a.b.c", true),
        ("a.>", "b.a", false),
        (">", "a", true),
        (">", "a.b", true),
        (">", "a.b.c.d.e.f.g.h.i.j.k.l.m.n.o.p", true),
        ("*", "a", true),
        ("*", "a.b", false),
        ("a.*.c", "a.b.c", true),
        ("a.*.c", "a.b.d", false),
        ("a.*.c", "a.c", false),
        ("a.*.c", "a.b.c.d", false),
        ("*.>", "a", false),
        ("*.>", "a.b", true),
        ("*.>", "a.b.c", true),
        ("*.*", "a.b", true),
        ("*.*", "a", false),
        ("*.*", "a.b.c", false),
        ("A.b", "a.b", false),
        ("a.b", "A.b", false),
        ("a.b", "a.b", true),
        ("a.b", "a.b.c", false),
        ("a.b.c", "a.b", false),
        ("a.b", "a.bc", false),
        ("ab", "a.b", false),
    ];

    #[test]
    fn naive_matches_table() {
        for &(pattern, subject, expected) in MATCH_CASES {
            assert_eq!(
                naive_matches(pattern, subject),
                expected,
                "{pattern:?} vs {subject:?}"
            );
        }
    }

    /// The grammar, from which valid subjects and patterns are generated.
    mod grammar {
        use proptest::prelude::*;

        /// Any printable ASCII except the separator and the wildcard characters.
        const LITERAL_TOKEN: &str = "[!-~&&[^.*>]]{1,15}";

        /// 16 tokens of at most 15 bytes plus 15 dots is exactly 255 bytes, so every draw
        /// is within both limits.
        pub fn subject() -> impl Strategy<Value = String> {
            prop::collection::vec(LITERAL_TOKEN, 1..=16).prop_map(|tokens| tokens.join("."))
        }

        pub fn pattern() -> impl Strategy<Value = String> {
            let token =
                prop_oneof![3 => LITERAL_TOKEN.prop_map(String::from), 1 => Just("*".to_string())];
            (prop::collection::vec(token, 1..=16), any::<bool>()).prop_map(
                |(mut tokens, tail_wildcard)| {
                    if tail_wildcard {
                        *tokens.last_mut().unwrap() = ">".to_string();
                    }
                    tokens.join(".")
                },
            )
        }
    }

    /// The language of valid subjects, stated directly rather than as a sequence of checks.
    fn in_subject_language(text: &str) -> bool {
        let tokens: Vec<&str> = text.split('.').collect();
        text.len() <= 255
            && tokens.len() <= 16
            && tokens.iter().all(|token| {
                !token.is_empty()
                    && token
                        .bytes()
                        .all(|b| (0x21..=0x7E).contains(&b) && b != b'*' && b != b'>')
            })
    }

    fn in_pattern_language(text: &str) -> bool {
        let tokens: Vec<&str> = text.split('.').collect();
        let (last, init) = tokens.split_last().unwrap();
        let literal = |token: &str| in_subject_language(token);
        text.len() <= 255
            && tokens.len() <= 16
            && init.iter().all(|&t| t == "*" || literal(t))
            && (*last == "*" || *last == ">" || literal(last))
    }

    /// Strings near the edge of the language: random characters that matter, whole tokens
    /// both good and bad (so wildcard placement comes up often), and lengths around the limits.
    fn hostile_string() -> impl Strategy<Value = String> {
        // Mostly good tokens, so that one misplaced '>' or bad token decides the answer.
        let near_miss_token = prop_oneof![
            6 => prop::sample::select(vec!["a", "b", "*"]),
            2 => Just(">"),
            1 => prop::sample::select(vec!["", "a*", ">b", "**", "a b", "\u{e9}"]),
        ];
        prop_oneof![
            "[ab.*> \t\u{7f}\u{e9}!~]{0,40}",
            prop::collection::vec(near_miss_token, 1..=17).prop_map(|tokens| tokens.join(".")),
            "[a.]{250,260}",
        ]
    }

    proptest! {
        #[test]
        fn checks_never_panic(text in any::<String>()) {
            let _ = check_pattern(&text);
            let _ = check_subject(&text);
        }

        #[test]
        fn generated_subjects_are_accepted(subject in grammar::subject()) {
            prop_assert_eq!(check_subject(&subject), Ok(()));
            prop_assert_eq!(check_pattern(&subject), Ok(()));
        }

        #[test]
        fn generated_patterns_are_accepted(pattern in grammar::pattern()) {
            prop_assert_eq!(check_pattern(&pattern), Ok(()));
        }

        #[test]
        fn check_subject_accepts_exactly_the_language(text in hostile_string()) {
            prop_assert_eq!(check_subject(&text).is_ok(), in_subject_language(&text));
        }

        #[test]
        fn check_pattern_accepts_exactly_the_language(text in hostile_string()) {
            prop_assert_eq!(check_pattern(&text).is_ok(), in_pattern_language(&text));
        }

        /// Every pattern matches itself when its wildcards are filled in with literal tokens.
        #[test]
        fn a_pattern_matches_its_own_instances(pattern in grammar::pattern(), filler in "[a-z]{1,3}") {
            let instance = pattern.split('.')
                .map(|token| if token == "*" || token == ">" { filler.as_str() } else { token })
                .collect::<Vec<_>>()
                .join(".");
            prop_assert!(naive_matches(&pattern, &instance));
        }
    }
}
