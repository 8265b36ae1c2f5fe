//! The README's Streams example is the one in `examples/stream_consumer.rs`, which `cargo test` builds:
//! every line of the README's snippet is a line of the example.

#[test]
fn the_readme_streams_snippet_is_the_example_that_builds() {
    let readme = include_str!("../README.md");
    let example = include_str!("../examples/stream_consumer.rs");
    let section = &readme[readme.find("## Streams").expect("a Streams section")..];
    let start = section.find("```rust\n").expect("a Rust snippet") + "```rust\n".len();
    let snippet = &section[start..start + section[start..].find("```").expect("its end")];
    let example_lines: Vec<&str> = example.lines().map(str::trim).collect();
    for line in snippet
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
    {
        // The example imports more than the snippet does (the connection it makes).
        if line.starts_with("use bussig_client::") {
            continue;
        }
        assert!(
            example_lines.contains(&line),
            "the README's line is not in examples/stream_consumer.rs: {line}"
        );
    }
}
