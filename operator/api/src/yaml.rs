//! Multi-document YAML (what `kubectl apply -f` accepts) to JSON values.

use serde_json::Value;

/// A YAML stream that could not be read.
#[derive(Debug)]
pub struct YamlError(pub String);

impl std::fmt::Display for YamlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid YAML: {}", self.0)
    }
}

impl std::error::Error for YamlError {}

/// Parses every document of a YAML stream; empty documents are skipped and
/// `kind: List` objects are flattened into their items.
pub fn documents(text: &str) -> Result<Vec<Value>, YamlError> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(text).map_err(|e| YamlError(e.to_string()))?;
    let mut out = Vec::new();
    for doc in docs {
        match doc {
            Value::Null => {}
            Value::Object(ref m) if m.get("kind").and_then(Value::as_str) == Some("List") => {
                if let Some(Value::Array(items)) = m.get("items") {
                    out.extend(items.iter().cloned());
                }
            }
            Value::Object(_) => out.push(doc),
            other => {
                return Err(YamlError(format!(
                    "a document is not an object but {}",
                    match other {
                        Value::Array(_) => "a list",
                        Value::String(_) => "a string",
                        _ => "a scalar",
                    }
                )));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_streams_and_lists() {
        let text = "---\napiVersion: v1\nkind: A\n---\n\n---\napiVersion: v1\nkind: List\nitems:\n- kind: B\n- kind: C\n";
        let docs = documents(text).expect("valid YAML");
        let kinds: Vec<_> = docs
            .iter()
            .map(|d| d["kind"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(kinds, ["A", "B", "C"]);
    }

    #[test]
    fn rejects_garbage() {
        assert!(documents("a: [unclosed").is_err());
        assert!(documents("- 1\n- 2\n").is_err());
    }
}
