//! NATS subjects as the relay needs them: checks for configured subjects and patterns, and the
//! mapping that turns a message's own subject into the subject it is published on.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SubjectError {
    #[error("subject `{0}` is empty or has an empty token (tokens are separated by `.`)")]
    EmptyToken(String),
    #[error("subject `{0}` contains whitespace or a non-printable or non-ASCII character")]
    InvalidCharacter(String),
    #[error("subject `{0}` is longer than 255 bytes")]
    TooLong(String),
    #[error("`{0}` has a wildcard, but a subject to publish on cannot have one")]
    Wildcard(String),
    #[error("pattern `{0}` has `>` before its last token")]
    TailNotLast(String),
    #[error("`{0}` has `*` or `>` inside a token: wildcards must be whole tokens")]
    PartialWildcard(String),
    #[error(
        "mapping `{from}` -> `{to}`: the target must use the same wildcards as the source, in the \
         same order (`{from}` has {from_wildcards}, `{to}` has {to_wildcards})"
    )]
    WildcardMismatch {
        from: String,
        to: String,
        from_wildcards: String,
        to_wildcards: String,
    },
}

/// Checks tokens shared by subjects and patterns; returns the tokens.
fn tokens(subject: &str) -> Result<Vec<&str>, SubjectError> {
    if subject.len() > 255 {
        return Err(SubjectError::TooLong(subject.to_string()));
    }
    if !subject.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(SubjectError::InvalidCharacter(subject.to_string()));
    }
    let tokens: Vec<&str> = subject.split('.').collect();
    if tokens.iter().any(|t| t.is_empty()) {
        return Err(SubjectError::EmptyToken(subject.to_string()));
    }
    Ok(tokens)
}

/// A subject to publish on: no wildcards.
pub fn check_subject(subject: &str) -> Result<(), SubjectError> {
    let tokens = tokens(subject)?;
    if tokens.iter().any(|t| t.contains('*') || t.contains('>')) {
        return Err(SubjectError::Wildcard(subject.to_string()));
    }
    Ok(())
}

/// A pattern: `*` matches one token, a last `>` one or more.
pub fn check_pattern(pattern: &str) -> Result<Vec<&str>, SubjectError> {
    let tokens = tokens(pattern)?;
    for (i, token) in tokens.iter().enumerate() {
        let wildcard = *token == "*" || *token == ">";
        if !wildcard && (token.contains('*') || token.contains('>')) {
            return Err(SubjectError::PartialWildcard(pattern.to_string()));
        }
        if *token == ">" && i + 1 != tokens.len() {
            return Err(SubjectError::TailNotLast(pattern.to_string()));
        }
    }
    Ok(tokens)
}

/// The wildcard tokens of a pattern, in order, written out for error messages.
fn wildcards(tokens: &[&str]) -> Vec<String> {
    tokens
        .iter()
        .filter(|t| **t == "*" || **t == ">")
        .map(|t| t.to_string())
        .collect()
}

fn describe(wildcards: &[String]) -> String {
    if wildcards.is_empty() {
        "none".to_string()
    } else {
        wildcards.join(" ")
    }
}

/// `orders.*` -> `prod.orders.*`: the i-th wildcard of the target receives what the i-th
/// wildcard of the source matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    from: Vec<String>,
    to: Vec<String>,
}

impl Mapping {
    pub fn new(from: &str, to: &str) -> Result<Mapping, SubjectError> {
        let from_tokens = check_pattern(from)?;
        let to_tokens = check_pattern(to)?;
        let (from_wildcards, to_wildcards) = (wildcards(&from_tokens), wildcards(&to_tokens));
        if from_wildcards != to_wildcards {
            return Err(SubjectError::WildcardMismatch {
                from: from.to_string(),
                to: to.to_string(),
                from_wildcards: describe(&from_wildcards),
                to_wildcards: describe(&to_wildcards),
            });
        }
        let owned = |tokens: Vec<&str>| tokens.into_iter().map(str::to_string).collect();
        Ok(Mapping {
            from: owned(from_tokens),
            to: owned(to_tokens),
        })
    }

    /// The target subject, or None when `subject` does not match the source pattern.
    pub fn apply(&self, subject: &str) -> Option<String> {
        let tokens: Vec<&str> = subject.split('.').collect();
        let mut captured: Vec<String> = Vec::new();
        for (i, pattern) in self.from.iter().enumerate() {
            match pattern.as_str() {
                ">" => {
                    if i >= tokens.len() {
                        return None;
                    }
                    captured.push(tokens[i..].join("."));
                    return Some(self.fill(captured));
                }
                "*" => captured.push(tokens.get(i)?.to_string()),
                literal => {
                    if tokens.get(i) != Some(&literal) {
                        return None;
                    }
                }
            }
        }
        (tokens.len() == self.from.len()).then(|| self.fill(captured))
    }

    fn fill(&self, captured: Vec<String>) -> String {
        let mut captured = captured.into_iter();
        self.to
            .iter()
            .map(|token| match token.as_str() {
                "*" | ">" => captured
                    .next()
                    .expect("checked: as many wildcards as captures"),
                literal => literal.to_string(),
            })
            .collect::<Vec<_>>()
            .join(".")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_checked() {
        assert_eq!(check_subject("prod.orders"), Ok(()));
        assert!(matches!(
            check_subject("a..b"),
            Err(SubjectError::EmptyToken(_))
        ));
        assert!(matches!(
            check_subject(""),
            Err(SubjectError::EmptyToken(_))
        ));
        assert!(matches!(
            check_subject("a b"),
            Err(SubjectError::InvalidCharacter(_))
        ));
        assert!(matches!(
            check_subject("a.*"),
            Err(SubjectError::Wildcard(_))
        ));
        assert!(matches!(
            check_subject(&"a".repeat(256)),
            Err(SubjectError::TooLong(_))
        ));
    }

    #[test]
    fn single_token_wildcards_map_in_order() {
        let mapping = Mapping::new("orders.*.*", "prod.orders.*.x.*").unwrap();
        assert_eq!(
            mapping.apply("orders.eu.paid").as_deref(),
            Some("prod.orders.eu.x.paid")
        );
        assert_eq!(mapping.apply("orders.eu"), None);
        assert_eq!(mapping.apply("orders.eu.paid.late"), None);
        assert_eq!(mapping.apply("billing.eu.paid"), None);
    }

    #[test]
    fn tail_wildcard_keeps_every_remaining_token() {
        let mapping = Mapping::new("orders.>", "prod.orders.>").unwrap();
        assert_eq!(
            mapping.apply("orders.eu.paid").as_deref(),
            Some("prod.orders.eu.paid")
        );
        assert_eq!(mapping.apply("orders"), None);
        let everything = Mapping::new(">", "mirror.>").unwrap();
        assert_eq!(everything.apply("a.b").as_deref(), Some("mirror.a.b"));
    }

    #[test]
    fn literal_mapping_renames_one_subject() {
        let mapping = Mapping::new("orders.created", "prod.orders.created").unwrap();
        assert_eq!(
            mapping.apply("orders.created").as_deref(),
            Some("prod.orders.created")
        );
        assert_eq!(mapping.apply("orders.deleted"), None);
    }

    #[test]
    fn invalid_mappings_are_refused() {
        let cases = [
            ("orders.*", "prod.orders", "same wildcards"),
            ("orders.*", "prod.>", "same wildcards"),
            ("orders.>", "prod.*", "same wildcards"),
            ("orders.>.x", "prod.>.x", "before its last token"),
            ("orders.a*", "prod.a*", "whole tokens"),
            ("orders..x", "prod.x", "empty token"),
        ];
        for (from, to, expected) in cases {
            let error = Mapping::new(from, to).expect_err(from).to_string();
            assert!(error.contains(expected), "{from} -> {to}: {error}");
        }
    }
}
