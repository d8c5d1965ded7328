//! Image paths in records are relative to the folder of the JSONL file that holds them. When a
//! tool reads records from one file and writes them to another folder, the paths must be rebased
//! or every image link breaks; these helpers do that lexically (no file needs to exist).

use std::path::{Component, Path, PathBuf};

use crate::record::VqaRecord;

use super::DataError;

/// The folder a JSONL file's relative image paths are resolved against (`.` for a bare name).
pub fn base_dir(file: &Path) -> PathBuf {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `path` made absolute against the current directory, with `.` and `..` folded lexically.
pub fn normalize(path: &Path) -> PathBuf {
    // `std::path::absolute` keeps `..`; folding them lets two spellings of a folder compare equal.
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut out = PathBuf::new();
    for c in absolute.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// `target` expressed relative to the folder `from` (with `..` where needed); both are normalized
/// first. Falls back to the absolute target when they share no root (other drive on Windows).
pub fn relative_to(target: &Path, from: &Path) -> PathBuf {
    let target = normalize(target);
    let from = normalize(from);
    let t: Vec<Component> = target.components().collect();
    let f: Vec<Component> = from.components().collect();
    let common = t.iter().zip(&f).take_while(|(a, b)| a == b).count();
    if common == 0 {
        return target;
    }
    let mut out = PathBuf::new();
    for _ in common..f.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c.as_os_str());
    }
    out
}

/// A path as the UTF-8 string a record stores; records are JSON, so other paths are refused.
pub fn path_string(path: &Path) -> Result<String, DataError> {
    path.to_str()
        .map(str::to_owned)
        .ok_or_else(|| DataError::Invalid(format!("path {} is not valid UTF-8", path.display())))
}

/// One record image path, relative to `from_dir` (or absolute), rewritten relative to `to_dir`.
/// Absolute paths are kept as they are.
pub fn rebase(image: &str, from_dir: &Path, to_dir: &Path) -> Result<String, DataError> {
    let p = Path::new(image);
    if p.is_absolute() {
        return Ok(image.to_owned());
    }
    path_string(&relative_to(&from_dir.join(p), to_dir))
}

/// Rebases every image path of `records` from `from_dir` to `to_dir` (a no-op when they are the
/// same folder).
pub fn rebase_records(records: &mut [VqaRecord], from_dir: &Path, to_dir: &Path) -> Result<(), DataError> {
    if normalize(from_dir) == normalize(to_dir) {
        return Ok(());
    }
    for r in records.iter_mut() {
        for img in r.images.iter_mut() {
            *img = rebase(img, from_dir, to_dir)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rebasing_keeps_links_valid() {
        assert_eq!(rebase("images/a.png", Path::new("/d/x"), Path::new("/d/x")).expect("ok"), "images/a.png");
        assert_eq!(rebase("images/a.png", Path::new("/d/x"), Path::new("/d/y")).expect("ok"), "../x/images/a.png");
        assert_eq!(rebase("images/a.png", Path::new("/d/x"), Path::new("/d")).expect("ok"), "x/images/a.png");
        assert_eq!(rebase("/abs/a.png", Path::new("/d/x"), Path::new("/e")).expect("ok"), "/abs/a.png");
        assert_eq!(rebase("../i/a.png", Path::new("/d/x/./"), Path::new("/d/i")).expect("ok"), "a.png");
    }

    #[test]
    fn base_dir_of_a_bare_name_is_cwd() {
        assert_eq!(base_dir(Path::new("r.jsonl")), PathBuf::from("."));
        assert_eq!(base_dir(Path::new("a/r.jsonl")), PathBuf::from("a"));
    }
}
