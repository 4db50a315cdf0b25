//! `lktest uevents`: listen on NETLINK_KOBJECT_UEVENT (the kernel's own broadcast, group 1:
//! no udev needed) and append one line per uevent to a file, flushed per line:
//! `ACTION=change DEVNAME=dm-3 DM_NAME=ubda5_crypt DM_COOKIE=786432 SEQNUM=...` — the
//! event's `KEY=value` pairs (only the keys asked for, in that order, when `--keys` is
//! given). Runs until FILE `--until` exists (checked every 200 ms) or it is killed. Writes
//! `--ready FILE` once the socket is bound, so a test can start its work after that.

use crate::Result;
use std::io::Write;
use std::path::Path;

pub fn listen(out: &Path, until: Option<&Path>, ready: Option<&Path>, keys: &[String]) -> Result<()> {
    // SAFETY: plain socket/bind/recv on a socket we own; buffers are ours and sized.
    let fd =
        unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, libc::NETLINK_KOBJECT_UEVENT) };
    if fd < 0 {
        return Err(format!("socket(NETLINK_KOBJECT_UEVENT): {}", std::io::Error::last_os_error()));
    }
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as u16;
    sa.nl_groups = 1; // the kernel's uevents
    let r = unsafe {
        libc::bind(fd, &sa as *const _ as *const libc::sockaddr, std::mem::size_of::<libc::sockaddr_nl>() as u32)
    };
    if r < 0 {
        return Err(format!("bind(NETLINK_KOBJECT_UEVENT): {}", std::io::Error::last_os_error()));
    }
    // A big receive buffer: a conversion raises bursts of events.
    let sz: libc::c_int = 4 << 20;
    unsafe {
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &sz as *const _ as *const libc::c_void, 4);
    }
    let tv = libc::timeval { tv_sec: 0, tv_usec: 200_000 };
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as u32,
        );
    }
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(out).map_err(crate::ioe("opening", out))?;
    if let Some(r) = ready {
        std::fs::write(r, b"ready\n").map_err(crate::ioe("writing", r))?;
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => {
                    if until.is_some_and(|u| u.exists()) {
                        return Ok(());
                    }
                    continue;
                }
                Some(libc::ENOBUFS) => {
                    writeln!(f, "LOST events (ENOBUFS)").map_err(crate::ioe("writing", out))?;
                    continue;
                }
                _ => return Err(format!("recv: {e}")),
            }
        }
        // "action@devpath\0KEY=value\0KEY=value\0..."
        let msg = &buf[..n as usize];
        let mut fields =
            msg.split(|&b| b == 0).filter(|p| !p.is_empty()).map(|p| String::from_utf8_lossy(p).into_owned());
        let _head = fields.next();
        let env: Vec<String> = fields.filter(|kv| kv.contains('=')).collect();
        let line = if keys.is_empty() {
            env.join(" ")
        } else {
            keys.iter()
                .filter_map(|k| env.iter().find(|kv| kv.split_once('=').map(|(a, _)| a) == Some(k.as_str())).cloned())
                .collect::<Vec<_>>()
                .join(" ")
        };
        writeln!(f, "{line}").map_err(crate::ioe("writing", out))?;
        f.flush().map_err(crate::ioe("writing", out))?;
        if until.is_some_and(|u| u.exists()) {
            return Ok(());
        }
    }
}
