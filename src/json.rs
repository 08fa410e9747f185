//! JSON from outside (admin API bodies, stored definitions) with errors that say where and
//! what, never which value. A leaf module: nothing in the crate below it.

use serde::Deserialize;

/// Deserialize JSON; the error names where (`fields.api_key`) and what went wrong, never a
/// value: serde's own messages quote the offending input (`invalid type: string "…"`), which
/// for a credential body is the secret itself.
pub fn parse_json<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, String> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut *de).map_err(|e| describe_json_error(&e))?;
    de.end().map_err(|e| describe_json_error_at("", &e))?;
    Ok(value)
}

fn describe_json_error(e: &serde_path_to_error::Error<serde_json::Error>) -> String {
    use serde_path_to_error::Segment;
    if !e.inner().is_data() {
        // Broken JSON has a position, not a field.
        return describe_json_error_at("", e.inner());
    }
    let mut path = String::new();
    for segment in e.path().iter() {
        match segment {
            Segment::Seq { index } => path.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(safe_name(key));
            }
            Segment::Unknown => path.push_str(if path.is_empty() { "?" } else { ".?" }),
        }
    }
    describe_json_error_at(&path, e.inner())
}

/// A name from the request (a map key) is echoed only when it is shaped like the names
/// sluice's schemas use (`api_key`, `allowed_domains`: lowercase letters, `_`, `-`, at most
/// 32): a key is not meant to be secret, but a token pasted in the wrong place must not come
/// back, and tokens carry digits or capitals.
fn safe_name(name: &str) -> &str {
    let schema_like = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b == b'_' || b == b'-');
    if schema_like { name } else { "<name>" }
}

fn describe_json_error_at(path: &str, e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let at = if path.is_empty() {
        format!("at line {} column {}", e.line(), e.column())
    } else {
        format!("at `{path}`")
    };
    let text = e.to_string();
    // serde_json appends " at line L column C"; the part before it is the message.
    let message = text
        .rfind(" at line ")
        .map_or(text.as_str(), |i| &text[..i]);
    let expected = |m: &str| {
        m.split_once(", expected ")
            .map_or(String::new(), |(_, exp)| format!(", expected {exp}"))
    };
    let problem = match e.classify() {
        // serde_json's syntax messages are fixed texts ("expected value", "trailing comma").
        Category::Syntax | Category::Eof | Category::Io => {
            return format!("not valid JSON {at}: {message}");
        }
        Category::Data => {
            if message.starts_with("invalid type: ") {
                format!("wrong type{}", expected(message))
            } else if message.starts_with("invalid value: ") {
                format!("invalid value{}", expected(message))
            } else if message.starts_with("invalid length ") {
                format!("wrong number of elements{}", expected(message))
            } else if message.starts_with("unknown variant ") {
                format!("unknown variant{}", expected(message))
            } else if message.starts_with("unknown field ") {
                format!("unknown field{}", expected(message))
            } else if let Some(field) = message
                .strip_prefix("missing field `")
                .and_then(|f| f.strip_suffix('`'))
            {
                format!("missing field `{}`", safe_name(field))
            } else if let Some(field) = message
                .strip_prefix("duplicate field `")
                .and_then(|f| f.strip_suffix('`'))
            {
                format!("duplicate field `{}`", safe_name(field))
            } else {
                "invalid value".to_string()
            }
        }
    };
    format!("{problem} {at}")
}
