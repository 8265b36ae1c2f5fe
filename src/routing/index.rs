//! A token trie of subscription patterns: finds every pattern matching a subject by walking the
//! subject once, so the cost follows the subject and the matching patterns, not the pattern count.
use std::collections::HashMap;

use super::subject::{SEPARATOR, SINGLE_WILDCARD, TAIL_WILDCARD};

/// Patterns with their values (bussig stores queue ids), looked up by subject.
#[derive(Debug, Clone)]
pub struct PatternIndex<T> {
    root: Node<T>,
    pair_count: usize,
}

/// One token position. Every pattern corresponds to exactly one (node, ending) slot, so the
/// pattern text lives there once, beside all the values subscribed with it.
#[derive(Debug, Clone)]
struct Node<T> {
    literal_children: HashMap<Box<str>, Node<T>>,
    single_wildcard_child: Option<Box<Node<T>>>,
    /// The pattern that is this node's path followed by `>`.
    tail_wildcard: Option<Subscribers<T>>,
    /// The pattern that is exactly this node's path.
    exact: Option<Subscribers<T>>,
}

#[derive(Debug, Clone)]
struct Subscribers<T> {
    pattern: Box<str>,
    /// Sorted and distinct, so a repeated insert is a no-op.
    values: Vec<T>,
}

impl<T: Copy + Ord> PatternIndex<T> {
    pub fn new() -> Self {
        PatternIndex {
            root: Node::new(),
            pair_count: 0,
        }
    }

    /// Adds `pattern` for `value`. The pattern must have passed `check_pattern`.
    pub fn insert(&mut self, pattern: &str, value: T) {
        debug_assert!(
            super::subject::check_pattern(pattern).is_ok(),
            "unchecked pattern {pattern:?}"
        );
        let subscribers = self
            .root
            .slot_for(pattern)
            .get_or_insert_with(|| Subscribers::new(pattern));
        if subscribers.add(value) {
            self.pair_count += 1;
        }
    }

    #[cfg(test)]
    /// The number of distinct (pattern, value) pairs.
    pub fn len(&self) -> usize {
        self.pair_count
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.pair_count == 0
    }

    /// Every (pattern, value) whose pattern matches `subject`, sorted by (value, pattern).
    /// `subject` should have passed `check_subject`; for anything else the answer is unspecified.
    pub fn matches<'a>(&'a self, subject: &str) -> Vec<(&'a str, T)> {
        let mut found = Vec::new();
        self.root.visit_matching(subject, &mut |subscribers| {
            let pattern: &'a str = &subscribers.pattern;
            found.extend(subscribers.values.iter().map(|&value| (pattern, value)));
        });
        found.sort_unstable_by(|(pattern_a, value_a), (pattern_b, value_b)| {
            (value_a, pattern_a).cmp(&(value_b, pattern_b))
        });
        found
    }

    /// The distinct values whose patterns match `subject`, ascending.
    pub fn matching_values(&self, subject: &str) -> Vec<T> {
        let mut found = Vec::new();
        self.root.visit_matching(subject, &mut |subscribers| {
            found.extend_from_slice(&subscribers.values);
        });
        found.sort_unstable();
        found.dedup();
        found
    }
}

impl<T: Copy + Ord> Default for PatternIndex<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Copy + Ord> Node<T> {
    fn new() -> Self {
        Node {
            literal_children: HashMap::new(),
            single_wildcard_child: None,
            tail_wildcard: None,
            exact: None,
        }
    }

    /// The slot where `pattern` ends, creating the path to it as needed.
    fn slot_for(&mut self, pattern: &str) -> &mut Option<Subscribers<T>> {
        let mut node = self;
        let mut tokens = pattern.split(SEPARATOR).peekable();
        while let Some(token) = tokens.next() {
            if token == TAIL_WILDCARD && tokens.peek().is_none() {
                return &mut node.tail_wildcard;
            }
            node = node.child_for(token);
        }
        &mut node.exact
    }

    fn child_for(&mut self, token: &str) -> &mut Node<T> {
        if token == SINGLE_WILDCARD {
            return self
                .single_wildcard_child
                .get_or_insert_with(|| Box::new(Node::new()));
        }
        // Look up first so that an existing token costs no allocation.
        if !self.literal_children.contains_key(token) {
            self.literal_children.insert(token.into(), Node::new());
        }
        self.literal_children.get_mut(token).expect("just inserted")
    }

    /// Calls `found` once for each pattern matching `rest`, the subject's tokens still to match.
    /// A node is reached by one path only, so no pattern is reported twice.
    fn visit_matching<'a>(&'a self, rest: &str, found: &mut impl FnMut(&'a Subscribers<T>)) {
        // Reaching here means at least one token remains, which is what '>' needs.
        if let Some(subscribers) = &self.tail_wildcard {
            found(subscribers);
        }
        let (token, after) = match rest.split_once(SEPARATOR) {
            Some((token, after)) => (token, Some(after)),
            None => (rest, None),
        };
        let literal_child = self.literal_children.get(token);
        let wildcard_child = self.single_wildcard_child.as_deref();
        for child in [literal_child, wildcard_child].into_iter().flatten() {
            match after {
                Some(after) => child.visit_matching(after, found),
                None => {
                    if let Some(subscribers) = &child.exact {
                        found(subscribers);
                    }
                }
            }
        }
    }
}

impl<T: Copy + Ord> Subscribers<T> {
    fn new(pattern: &str) -> Self {
        Subscribers {
            pattern: pattern.into(),
            values: Vec::new(),
        }
    }

    /// Returns whether the value was new for this pattern.
    fn add(&mut self, value: T) -> bool {
        match self.values.binary_search(&value) {
            Ok(_) => false,
            Err(at) => {
                self.values.insert(at, value);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;
    use crate::routing::subject::naive_matches;

    fn index_of(pairs: &[(&str, i32)]) -> PatternIndex<i32> {
        let mut index = PatternIndex::new();
        for &(pattern, value) in pairs {
            index.insert(pattern, value);
        }
        index
    }

    #[test]
    fn agrees_with_the_match_table() {
        for &(pattern, subject, expected) in crate::routing::subject::tests::MATCH_CASES {
            let index = index_of(&[(pattern, 7)]);
            let wanted = if expected { vec![(pattern, 7)] } else { vec![] };
            assert_eq!(index.matches(subject), wanted, "{pattern:?} vs {subject:?}");
        }
    }

    #[test]
    fn empty_index_matches_nothing() {
        let index = PatternIndex::<i32>::default();
        assert!(index.is_empty());
        assert_eq!(index.len(), 0);
        assert_eq!(index.matches("a.b"), vec![]);
        assert_eq!(index.matching_values("a"), Vec::<i32>::new());
    }

    #[test]
    fn overlapping_patterns_give_a_value_once() {
        let index = index_of(&[("a.b", 1), ("a.*", 1), ("a.>", 1), (">", 1), ("*.b", 2)]);
        assert_eq!(index.matching_values("a.b"), vec![1, 2]);
        assert_eq!(
            index.matches("a.b"),
            vec![(">", 1), ("a.*", 1), ("a.>", 1), ("a.b", 1), ("*.b", 2)]
        );
    }

    #[test]
    fn results_are_sorted_by_value_then_pattern() {
        let index = index_of(&[
            ("a.b", 30),
            ("*.b", 10),
            (">", 20),
            ("a.>", 10),
            ("a.*", 30),
        ]);
        assert_eq!(
            index.matches("a.b"),
            vec![
                ("*.b", 10),
                ("a.>", 10),
                (">", 20),
                ("a.*", 30),
                ("a.b", 30)
            ]
        );
        assert_eq!(index.matching_values("a.b"), vec![10, 20, 30]);
    }

    #[test]
    fn duplicate_inserts_are_stored_once() {
        let index = index_of(&[("a.*", 1), ("a.*", 1), ("a.*", 2), (">", 1), (">", 1)]);
        assert_eq!(index.len(), 3);
        assert!(!index.is_empty());
        assert_eq!(index.matches("a.b"), vec![(">", 1), ("a.*", 1), ("a.*", 2)]);
    }

    #[test]
    fn tail_wildcard_needs_a_token_after_its_prefix() {
        let index = index_of(&[("a.>", 1), ("a", 2), ("a.b.>", 3)]);
        assert_eq!(index.matching_values("a"), vec![2]);
        assert_eq!(index.matching_values("a.b"), vec![1]);
        assert_eq!(index.matching_values("a.b.c"), vec![1, 3]);
    }

    #[test]
    fn many_literal_siblings_and_a_wildcard_beside_them() {
        // The shape of per-queue subscriptions: only the one literal and the wildcard match.
        let mut index = PatternIndex::new();
        for queue in 0..1000 {
            index.insert(&format!("orders.{queue}.created"), queue);
        }
        index.insert("orders.*.created", -1);
        assert_eq!(index.len(), 1001);
        assert_eq!(index.matching_values("orders.42.created"), vec![-1, 42]);
        assert_eq!(index.matching_values("orders.none.created"), vec![-1]);
        assert_eq!(index.matching_values("orders.42"), Vec::<i32>::new());
    }

    /// Tokens from a tiny alphabet so that matches are frequent; '>' only last.
    fn small_pattern() -> impl Strategy<Value = String> {
        let inner = prop::sample::select(vec!["a", "b", "c", "*"]);
        let last = prop::sample::select(vec!["a", "b", "c", "*", ">"]);
        (prop::collection::vec(inner, 0..=4), last).prop_map(|(mut tokens, last)| {
            tokens.push(last);
            tokens.join(".")
        })
    }

    fn small_subject() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(vec!["a", "b", "c"]), 1..=6)
            .prop_map(|tokens| tokens.join("."))
    }

    proptest! {
        #[test]
        fn index_agrees_with_brute_force(
            pairs in prop::collection::vec((small_pattern(), 0..5i32), 0..24),
            subjects in prop::collection::vec(small_subject(), 1..16),
        ) {
            let mut index = PatternIndex::new();
            for (pattern, value) in &pairs {
                index.insert(pattern, *value);
            }
            let distinct: BTreeSet<(i32, &str)> =
                pairs.iter().map(|(p, v)| (*v, p.as_str())).collect();
            prop_assert_eq!(index.len(), distinct.len());
            for subject in &subjects {
                let wanted: Vec<(&str, i32)> = distinct
                    .iter()
                    .filter(|(_, pattern)| naive_matches(pattern, subject))
                    .map(|&(value, pattern)| (pattern, value))
                    .collect();
                let mut wanted_values: Vec<i32> = wanted.iter().map(|&(_, v)| v).collect();
                wanted_values.dedup();
                prop_assert_eq!(index.matches(subject), wanted, "subject {:?}", subject);
                prop_assert_eq!(index.matching_values(subject), wanted_values);
            }
        }
    }
}
