//! Where the objects of a services file lie in its text, and how a new version of the file is
//! split into them reusing the last version's split where the two texts agree.
//!
//! A services file of 10000 Services is several megabytes; an update usually changes one
//! object. Splitting the whole text again (serde walking every byte of every object) costs
//! more than all the rest of an update. The objects that lie wholly within the texts' common
//! prefix, or wholly within their common suffix, are the same objects at the same (or shifted)
//! offsets: only the text between them is split again. Anything unexpected there (a broken
//! separator, a changed frame around the array) gives up, and the caller splits the whole
//! text, which reports the file's errors as a first read would.

use serde::Deserialize;
use serde_json::value::RawValue;
use std::ops::Range;

/// The services file's frame: `{"services": [...]}` and nothing else.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File<'a> {
    #[serde(borrow)]
    services: Vec<&'a RawValue>,
}

/// The split of one text: each object's span, and the array's bounds around them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Just after the array's `[`.
    pub open: usize,
    /// At the array's `]`.
    pub close: usize,
    /// Each object's bytes, in file order.
    pub objects: Vec<Range<usize>>,
}

/// One object of a new text: where it is, and where it was in the old text if it lies in
/// what the two texts share (the same bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub span: Range<usize>,
    /// Its index in the old layout.
    pub was: Option<usize>,
}

/// JSON's whitespace (RFC 8259: space, tab, line feed, carriage return), not Unicode's.
fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// Splits a whole services file: its objects' spans. Err: it is not a services file
/// (`{"services": [...]}`). The layout is None for a file with no objects (there is nothing
/// to reuse).
pub fn split(text: &str) -> Result<(Vec<Range<usize>>, Option<Layout>), serde_json::Error> {
    let f: File = serde_json::from_str(text)?;
    let base = text.as_ptr() as usize;
    let objects: Vec<Range<usize>> = f
        .services
        .iter()
        .map(|raw| {
            let start = raw.get().as_ptr() as usize - base;
            start..start + raw.get().len()
        })
        .collect();
    let layout = (|| {
        let bytes = text.as_bytes();
        let first = objects.first()?.start;
        let last = objects.last()?.end;
        let open = bytes[..first].iter().rposition(|&b| !is_ws(b))?;
        let close = last + bytes[last..].iter().position(|&b| !is_ws(b))?;
        (bytes[open] == b'[' && bytes[close] == b']').then(|| Layout {
            open: open + 1,
            close,
            objects: objects.clone(),
        })
    })();
    Ok((objects, layout))
}

/// Splits `new` reusing `old`'s layout: the objects in the texts' common prefix and suffix are
/// taken as they are, the text between them split again. None where that cannot be done
/// safely (the frame around the array changed, the separators between reused and new objects
/// are not exactly one comma, the text between does not split): split the whole text then.
pub fn split_after(old: &str, layout: &Layout, new: &str) -> Option<(Vec<Piece>, Layout)> {
    let (a, b) = (old.as_bytes(), new.as_bytes());
    let shortest = a.len().min(b.len());
    let prefix = common_prefix(a, b);
    let suffix = common_suffix(a, b).min(shortest - prefix);
    let shifted = |at: usize| at + b.len() - a.len();
    let objects = &layout.objects;
    let kept_before = objects.partition_point(|o| o.end <= prefix);
    let kept_after = kept_before.max(objects.partition_point(|o| o.start < a.len() - suffix));
    // The text between the last object kept before and the first kept after.
    let from = match kept_before {
        0 if layout.open > prefix => return None,
        0 => layout.open,
        n => objects[n - 1].end,
    };
    let to = match objects.get(kept_after) {
        Some(o) => shifted(o.start),
        None if layout.close < a.len() - suffix => return None,
        None => shifted(layout.close),
    };
    let between = middle(&new[from..to], kept_before > 0, kept_after < objects.len())?;
    let mut pieces: Vec<Piece> = (0..kept_before)
        .map(|i| Piece {
            span: objects[i].clone(),
            was: Some(i),
        })
        .collect();
    pieces.extend(between.into_iter().map(|r| Piece {
        span: from + r.start..from + r.end,
        was: None,
    }));
    pieces.extend((kept_after..objects.len()).map(|i| Piece {
        span: shifted(objects[i].start)..shifted(objects[i].end),
        was: Some(i),
    }));
    // The frame before the first object and after the last is the same bytes (in the prefix
    // and the suffix): the array's bounds move with the end of the text.
    let layout = Layout {
        open: layout.open,
        close: shifted(layout.close),
        objects: pieces.iter().map(|p| p.span.clone()).collect(),
    };
    Some((pieces, layout))
}

/// Bytes compared at once (memcmp) before the first difference is looked for byte by byte.
const BLOCK: usize = 256;

/// The length of the longest common prefix of `a` and `b`.
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    let n = a.len().min(b.len());
    let mut at = 0;
    while at + BLOCK <= n && a[at..at + BLOCK] == b[at..at + BLOCK] {
        at += BLOCK;
    }
    at + (a[at..n].iter().zip(&b[at..n]))
        .take_while(|(x, y)| x == y)
        .count()
}

/// The length of the longest common suffix of `a` and `b`.
fn common_suffix(a: &[u8], b: &[u8]) -> usize {
    let n = a.len().min(b.len());
    let (a, b) = (&a[a.len() - n..], &b[b.len() - n..]);
    let mut len = 0;
    while len + BLOCK <= n && a[n - len - BLOCK..n - len] == b[n - len - BLOCK..n - len] {
        len += BLOCK;
    }
    len + (a[..n - len].iter().rev().zip(b[..n - len].iter().rev()))
        .take_while(|(x, y)| x == y)
        .count()
}

/// The objects of the text between kept objects (spans within it): with an object kept
/// `before` it, it must start with the comma after that object; with one kept `after`, end
/// with the comma before that one; with both and nothing new, be that one comma.
fn middle(text: &str, before: bool, after: bool) -> Option<Vec<Range<usize>>> {
    let bytes = text.as_bytes();
    let start = bytes.iter().position(|&b| !is_ws(b));
    let Some(start) = start else {
        // Only whitespace: right only where no comma is needed.
        return (!(before && after)).then(Vec::new);
    };
    let end = bytes.iter().rposition(|&b| !is_ws(b))? + 1;
    let mut inner = start..end;
    if before && after && &text[inner.clone()] == "," {
        return Some(Vec::new());
    }
    if before {
        (bytes[inner.start] == b',').then_some(())?;
        inner.start += 1;
    }
    if after {
        (inner.end > inner.start && bytes[inner.end - 1] == b',').then_some(())?;
        inner.end -= 1;
    }
    let list = &text[inner.clone()];
    if list.bytes().all(is_ws) {
        // A comma with nothing after it (`[a,]`), or two in a row.
        return None;
    }
    let wrapped = format!("[{list}]");
    let raws: Vec<&RawValue> = serde_json::from_str(&wrapped).ok()?;
    let base = wrapped.as_ptr() as usize + 1;
    Some(
        raws.iter()
            .map(|raw| {
                let at = inner.start + raw.get().as_ptr() as usize - base;
                at..at + raw.get().len()
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Objects of every JSON kind, self-delimiting or not (numbers and literals are not: `12`
    /// and `123` share a prefix).
    fn object() -> impl Strategy<Value = String> {
        prop_oneof![
            (0u8..6).prop_map(|i| format!(r#"{{"name": "ns/s{i}", "port": {i}}}"#)),
            (0u32..200).prop_map(|n| n.to_string()),
            Just("true".to_string()),
            Just(r#""a,]""#.to_string()),
            Just("[1, {}]".to_string()),
        ]
    }

    fn file(objects: &[String], ws: &str) -> String {
        format!(
            r#"{{"services":{ws}[{ws}{}{ws}]}}"#,
            objects.join(&format!("{ws},"))
        )
    }

    /// A whole split's objects, as text.
    fn texts(text: &str, spans: &[Range<usize>]) -> Vec<String> {
        spans.iter().map(|r| text[r.clone()].to_string()).collect()
    }

    /// Edits of one file into another: objects added, removed, replaced, and bytes anywhere
    /// changed, inserted or removed (the frame included).
    #[derive(Debug, Clone)]
    enum Edit {
        Insert(usize, String),
        Remove(usize),
        Replace(usize, String),
        Byte(usize, u8),
        Cut(usize),
        Add(usize, u8),
    }

    fn edit() -> impl Strategy<Value = Edit> {
        let byte = prop_oneof![
            Just(b','),
            Just(b' '),
            Just(b'1'),
            Just(b'}'),
            Just(b']'),
            Just(b'"'),
            Just(b'x')
        ];
        prop_oneof![
            (any::<usize>(), object()).prop_map(|(i, o)| Edit::Insert(i, o)),
            any::<usize>().prop_map(Edit::Remove),
            (any::<usize>(), object()).prop_map(|(i, o)| Edit::Replace(i, o)),
            (any::<usize>(), byte.clone()).prop_map(|(i, b)| Edit::Byte(i, b)),
            any::<usize>().prop_map(Edit::Cut),
            (any::<usize>(), byte).prop_map(|(i, b)| Edit::Add(i, b)),
        ]
    }

    fn apply(objects: &[String], ws: &str, edit: &Edit) -> String {
        let mut objects = objects.to_vec();
        let n = objects.len();
        match edit {
            Edit::Insert(i, o) => objects.insert(i % (n + 1), o.clone()),
            Edit::Remove(i) if n > 0 => {
                objects.remove(i % n);
            }
            Edit::Replace(i, o) if n > 0 => objects[i % n] = o.clone(),
            Edit::Remove(_) | Edit::Replace(..) => {}
            Edit::Byte(i, b) | Edit::Add(i, b) => {
                let mut bytes = file(&objects, ws).into_bytes();
                let at = i % bytes.len();
                match edit {
                    Edit::Byte(..) => bytes[at] = *b,
                    _ => bytes.insert(at, *b),
                }
                return String::from_utf8(bytes).unwrap();
            }
            Edit::Cut(i) => {
                let mut bytes = file(&objects, ws).into_bytes();
                bytes.remove(i % bytes.len());
                return String::from_utf8(bytes).unwrap();
            }
        }
        file(&objects, ws)
    }

    proptest! {
        /// Whatever the edit, a split reusing the last one gives the objects a whole split of
        /// the new text gives, or gives up; it never takes a text a whole split refuses. Its
        /// layout is the whole split's, so the next split builds on a true one.
        #[test]
        fn test_a_reused_split_is_the_whole_split(
            objects in prop::collection::vec(object(), 0..8),
            ws in prop_oneof![Just(""), Just(" "), Just("\n  ")],
            edits in prop::collection::vec(edit(), 1..4),
        ) {
            let mut old = file(&objects, ws);
            let (_, mut layout) = split(&old).unwrap();
            for e in &edits {
                let new = apply(&objects, ws, e);
                let whole = split(&new);
                let Some(last) = &layout else { break };
                match (split_after(&old, last, &new), &whole) {
                    (Some((pieces, next)), Ok((spans, whole_layout))) => {
                        let got: Vec<Range<usize>> = pieces.iter().map(|p| p.span.clone()).collect();
                        prop_assert_eq!(texts(&new, &got), texts(&new, spans));
                        prop_assert_eq!(&got, spans);
                        if let Some(w) = whole_layout {
                            prop_assert_eq!(&next, w);
                        }
                        for p in &pieces {
                            if let Some(w) = p.was {
                                prop_assert_eq!(&new[p.span.clone()], &old[last.objects[w].clone()]);
                            }
                        }
                    }
                    (Some(_), Err(e)) => prop_assert!(false, "took {new:?}, which a whole split refuses: {e}"),
                    (None, _) => {}
                }
                if let Ok((_, l)) = whole {
                    old = new;
                    layout = l;
                }
            }
        }
    }

    /// One object changed in a long file: it alone is split out again, the others are reused
    /// where they lie (shifted after it).
    #[test]
    fn test_one_changed_object_is_the_only_one_split_again() {
        let objects: Vec<String> = (0..100).map(|i| format!(r#"{{"port": {i}}}"#)).collect();
        let old = file(&objects, "\n");
        let (_, layout) = split(&old).unwrap();
        let mut changed = objects.clone();
        changed[40] = r#"{"port": 4000}"#.to_string();
        let new = file(&changed, "\n");
        let (pieces, _) = split_after(&old, &layout.unwrap(), &new).unwrap();
        let fresh: Vec<usize> = (0..pieces.len())
            .filter(|&i| pieces[i].was.is_none())
            .collect();
        assert_eq!(fresh, [40]);
        assert_eq!(&new[pieces[40].span.clone()], r#"{"port": 4000}"#);
        assert_eq!(pieces[41].was, Some(41));
        assert_eq!(&new[pieces[99].span.clone()], r#"{"port": 99}"#);
    }
}
