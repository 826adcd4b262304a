//! The config text as a spanned TOML document: where every key is, and deserialisation that
//! reports every problem serde finds, each at its key, instead of stopping at the first.
//!
//! serde stops at the first value it cannot take. [`Document::deserialize`] records that
//! problem at the key it belongs to, takes the key out of (a copy of) the document and tries
//! again, until the rest deserialises or nothing more can be taken out. Keys taken out are
//! remembered, so later checks do not also report them as missing.

use std::collections::BTreeSet;
use std::ops::Range;

use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// One step of a key path: a table key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
  Key(String),
  Index(usize),
}

/// A key's place in the document, as `functions[0].limits.cpu_ms`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct KeyPath(Vec<Segment>);

impl std::fmt::Display for KeyPath {
  fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
    for (i, segment) in self.0.iter().enumerate() {
      match segment {
        Segment::Key(key) if i == 0 => f.write_str(key)?,
        Segment::Key(key) => write!(f, ".{key}")?,
        Segment::Index(index) => write!(f, "[{index}]")?,
      }
    }
    Ok(())
  }
}

/// A problem found while deserialising: where, which key, what.
#[derive(Debug, Clone)]
pub(crate) struct Problem {
  pub span: Range<usize>,
  pub key: String,
  pub message: String,
}

/// A parsed config document.
pub(crate) struct Document<'i> {
  root: Spanned<DeTable<'i>>,
  /// Keys taken out because their values were refused (as `KeyPath` text).
  removed: BTreeSet<String>,
}

impl<'i> Document<'i> {
  /// Parses `text`, going on past syntax errors; every syntax error is returned with its
  /// span (and the key it is in, when it is in one).
  pub fn parse(text: &'i str) -> (Document<'i>, Vec<Problem>) {
    let (root, errors) = DeTable::parse_recoverable(text);
    let document = Document {
      root,
      removed: BTreeSet::new(),
    };
    let problems = errors
      .into_iter()
      .map(|err| {
        let span = err.span().unwrap_or(0..0);
        let key = document
          .find(&span)
          .map_or_else(|| "syntax".to_string(), |path| path.to_string());
        Problem {
          span,
          key,
          message: format!("TOML syntax: {}", err.message().trim_end()),
        }
      })
      .collect();
    (document, problems)
  }

  /// Deserialises the document, taking out and reporting each value serde refuses.
  pub fn deserialize<T: DeserializeOwned>(&mut self) -> (Option<T>, Vec<Problem>) {
    let mut problems = Vec::new();
    // Each round takes one key out; a document has only so many.
    for _ in 0..256 {
      let error = match T::deserialize(toml::de::Deserializer::from(self.root.clone())) {
        Ok(value) => return (Some(value), problems),
        Err(error) => error,
      };
      let span = error.span().unwrap_or(0..0);
      let message = error.message().trim_end().to_string();
      let Some(mut path) = self.find(&span) else {
        problems.push(Problem {
          span,
          key: "document".into(),
          message,
        });
        return (None, problems);
      };
      // "missing field `x`" is found at the table that lacks it.
      let key = match message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next())
      {
        Some(field) if path.0.is_empty() => field.to_string(),
        Some(field) => format!("{path}.{field}"),
        None => path.to_string(),
      };
      // serde points at the value it refused, or at an unknown key; a missing field at the
      // table, which is shown at that table's key.
      let span = if message.starts_with("missing field") {
        self.span_of(&path, false).unwrap_or(span)
      } else {
        span
      };
      problems.push(Problem { span, key, message });
      if path.0.is_empty() || !self.remove(&mut path) {
        return (None, problems);
      }
    }
    (None, problems)
  }

  /// Whether `key` (as `KeyPath` text) was taken out for a refused value.
  pub fn removed(&self, key: &str) -> bool {
    self.removed.contains(key)
  }

  /// Where the value of `key` (`server.max_header_bytes`, `functions[0].routes[1]`) is, when
  /// the document has it.
  pub fn value_span(&self, key: &str) -> Option<Range<usize>> {
    let path = parse_path(key)?;
    self.span_of(&path, true)
  }

  /// The span of the key at `path` (or with `value`, of its value); for an array element,
  /// the element's.
  fn span_of(&self, path: &KeyPath, value_wanted: bool) -> Option<Range<usize>> {
    let mut table = self.root.get_ref();
    let mut value: Option<&Spanned<DeValue<'i>>> = None;
    let mut span = None;
    for segment in &path.0 {
      match segment {
        Segment::Key(name) => {
          let current = match value {
            None => table,
            Some(v) => v.get_ref().as_table()?,
          };
          let (key, found) = current.iter().find(|(k, _)| k.get_ref() == name)?;
          span = Some(if value_wanted {
            found.span()
          } else {
            key.span()
          });
          value = Some(found);
        }
        Segment::Index(index) => {
          let found = value?.get_ref().as_array()?.get(*index)?;
          span = Some(found.span());
          value = Some(found);
        }
      }
      if let Some(v) = value
        && let Some(t) = v.get_ref().as_table()
      {
        table = t;
      }
    }
    span
  }

  /// The deepest key (or array element) whose key or value holds `span`.
  fn find(&self, span: &Range<usize>) -> Option<KeyPath> {
    let mut path = Vec::new();
    find_in_table(self.root.get_ref(), span, &mut path).then_some(KeyPath(path))
  }

  /// Takes the value at `path` out of the document. An array element is taken out with
  /// its array (indices of the elements after it would shift); a key with its table entry.
  fn remove(&mut self, path: &mut KeyPath) -> bool {
    while matches!(path.0.last(), Some(Segment::Index(_))) {
      path.0.pop();
    }
    let Some(Segment::Key(last)) = path.0.pop() else {
      return false;
    };
    let parent = match walk_mut(self.root.get_mut(), &path.0) {
      Some(parent) => parent,
      None => return false,
    };
    let Some(key) = parent.keys().find(|k| k.get_ref() == &last).cloned() else {
      return false;
    };
    parent.remove(&key);
    path.0.push(Segment::Key(last));
    self.removed.insert(path.to_string());
    true
  }
}

fn contains(outer: &Range<usize>, inner: &Range<usize>) -> bool {
  outer.start <= inner.start && inner.end <= outer.end && outer.start < outer.end
}

/// Searches every entry (table spans of `[[array]]` elements do not always cover their
/// contents, so children are searched whatever their parents' spans).
fn find_in_table(table: &DeTable<'_>, span: &Range<usize>, path: &mut Vec<Segment>) -> bool {
  for (key, value) in table.iter() {
    path.push(Segment::Key(key.get_ref().to_string()));
    if contains(&key.span(), span) || find_in_value(value, span, path) {
      return true;
    }
    if contains(&value.span(), span) {
      return true;
    }
    path.pop();
  }
  false
}

fn find_in_value(
  value: &Spanned<DeValue<'_>>,
  span: &Range<usize>,
  path: &mut Vec<Segment>,
) -> bool {
  match value.get_ref() {
    DeValue::Table(table) => find_in_table(table, span, path),
    DeValue::Array(array) => {
      for (index, element) in array.iter().enumerate() {
        path.push(Segment::Index(index));
        if find_in_value(element, span, path) || contains(&element.span(), span) {
          return true;
        }
        path.pop();
      }
      false
    }
    _ => false,
  }
}

/// The table at `path` (keys and indices), for changing.
fn walk_mut<'a, 'i>(table: &'a mut DeTable<'i>, path: &[Segment]) -> Option<&'a mut DeTable<'i>> {
  let Some((first, rest)) = path.split_first() else {
    return Some(table);
  };
  let Segment::Key(name) = first else {
    return None;
  };
  let value = table.iter_mut().find(|(k, _)| k.get_ref() == name)?.1;
  walk_value_mut(value.get_mut(), rest)
}

fn walk_value_mut<'a, 'i>(
  value: &'a mut DeValue<'i>,
  path: &[Segment],
) -> Option<&'a mut DeTable<'i>> {
  match (path.split_first(), value) {
    (None, DeValue::Table(table)) => Some(table),
    (Some((Segment::Key(_), _)), DeValue::Table(table)) => walk_mut(table, path),
    (Some((Segment::Index(index), rest)), DeValue::Array(array)) => {
      walk_value_mut(array.get_mut(*index)?.get_mut(), rest)
    }
    _ => None,
  }
}

/// `a.b[0].c` as segments.
fn parse_path(text: &str) -> Option<KeyPath> {
  let mut segments = Vec::new();
  for part in text.split('.') {
    let (name, indices) = part
      .split_once('[')
      .map_or((part, ""), |(n, rest)| (n, rest));
    if !name.is_empty() {
      segments.push(Segment::Key(name.to_string()));
    }
    if !indices.is_empty() {
      for index in format!("[{indices}").split('[').filter(|s| !s.is_empty()) {
        segments.push(Segment::Index(index.trim_end_matches(']').parse().ok()?));
      }
    }
  }
  Some(KeyPath(segments))
}
