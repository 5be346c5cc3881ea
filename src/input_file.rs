//! Reading the files a user names (texts, prompts, configurations, tokenizers, reports): regular
//! files only, since opening a FIFO blocks until someone writes and a device may never end, and
//! never more than a stated bound, checked against the file's size before anything is read.

use std::fs::Metadata;
use std::io::{self, Read};
use std::path::Path;

/// The largest text or prompts file read whole (1 GiB).
pub const MAX_TEXT_BYTES: u64 = 1 << 30;
/// The largest JSON file read whole: configurations, indexes, tokenizers, reports (512 MiB;
/// the largest published `tokenizer.json` files are tens of MB).
pub const MAX_JSON_BYTES: u64 = 512 << 20;

/// What kind of file `meta` describes, for messages (from `symlink_metadata`, a link is named
/// as such).
pub fn kind_of(meta: &Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_file() {
        "a regular file"
    } else {
        "not a regular file"
    }
}

/// The metadata of `path` (links followed) if it is a regular file; otherwise an error of kind
/// `InvalidInput` that says what it is instead.
pub fn regular_file(path: &Path) -> io::Result<Metadata> {
    let meta = std::fs::metadata(path)?;
    if meta.is_file() {
        Ok(meta)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("it is {}, not a regular file", kind_of(&meta)),
        ))
    }
}

/// Reads all of `path`, a regular file of at most `max` bytes.
pub fn read(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let meta = regular_file(path)?;
    if meta.len() > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "it holds {} bytes, more than the {max} this file may have",
                meta.len()
            ),
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // The bound holds even if the file grows while it is read.
    std::fs::File::open(path)?
        .take(max + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("it grew past {max} bytes while being read"),
        ));
    }
    Ok(bytes)
}

/// Reads all of `path` as UTF-8 text, a regular file of at most `max` bytes.
pub fn read_to_string(path: &Path, max: u64) -> io::Result<String> {
    String::from_utf8(read(path, max)?)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("not UTF-8 text: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_is_not_a_regular_file_and_what_is_too_big() {
        let dir = tempfile::tempdir().unwrap();
        let e = read(dir.path(), 10).unwrap_err();
        assert!(e.to_string().contains("a directory"), "{e}");
        let e = read(Path::new("/dev/zero"), 10).unwrap_err();
        assert!(e.to_string().contains("a character device"), "{e}");
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo only creates a node.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read(&fifo, 10).unwrap_err();
        assert!(e.to_string().contains("FIFO"), "{e}");
        let f = dir.path().join("f");
        std::fs::write(&f, b"12345").unwrap();
        assert_eq!(read(&f, 5).unwrap(), b"12345");
        let e = read(&f, 4).unwrap_err();
        assert!(e.to_string().contains("holds 5 bytes"), "{e}");
        std::fs::write(&f, [0xff, 0xfe]).unwrap();
        assert!(read_to_string(&f, 5).is_err());
    }
}
