//! Out-of-band channel: one TCP connection (loopback unless the user names a host) used only
//! to exchange the run configuration and endpoint addresses, and for barriers. Never on the
//! timed path. Every read is bounded by the run's timeout.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::process::Child;
use std::time::{Duration, Instant};

use crate::{err, Result};

#[derive(Debug)]
pub struct Oob {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Oob {
    fn new(s: TcpStream, timeout: Duration) -> Result<Oob> {
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        Ok(Oob {
            r: BufReader::new(s.try_clone()?),
            w: s,
        })
    }

    /// Connects to `addr`, retrying until `timeout` (the server may not be listening yet).
    pub fn connect(addr: &str, timeout: Duration) -> Result<Oob> {
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|e| {
                err(format!(
                    "bad peer address '{addr}': {e} (expected HOST:PORT)"
                ))
            })?
            .collect();
        let deadline = Instant::now() + timeout;
        loop {
            let mut last = None;
            for a in &addrs {
                match TcpStream::connect_timeout(a, Duration::from_secs(1)) {
                    Ok(s) => return Oob::new(s, timeout),
                    Err(e) => last = Some(e),
                }
            }
            if Instant::now() >= deadline {
                return Err(err(format!(
                    "could not connect to the server at {addr} within {timeout:?}: {} \
                     (is `efa-bench ... --listen` running there?)",
                    last.map(|e| e.to_string()).unwrap_or_default()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Accepts one connection within `timeout`; gives up early if `child` (the spawned
    /// server) exits first.
    pub fn accept(
        l: &TcpListener,
        timeout: Duration,
        mut child: Option<&mut Child>,
    ) -> Result<Oob> {
        l.set_nonblocking(true)?;
        let deadline = Instant::now() + timeout;
        loop {
            match l.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false)?;
                    return Oob::new(s, timeout);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
            if let Some(c) = child.as_deref_mut() {
                if let Some(st) = c.try_wait()? {
                    return Err(err(format!("the server process exited early ({st})")));
                }
            }
            if Instant::now() >= deadline {
                return Err(err(format!(
                    "no client connected within {timeout:?} on {}",
                    l.local_addr()?
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// False once the peer has closed the connection (its process is gone).
    pub fn peer_alive(&self) -> Result<bool> {
        self.w.set_nonblocking(true)?;
        let mut b = [0u8; 1];
        let r = self.w.peek(&mut b);
        self.w.set_nonblocking(false)?;
        match r {
            Ok(0) => Ok(false),
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(true),
            Err(e) => Err(e.into()),
        }
    }

    pub fn send(&mut self, line: &str) -> Result<()> {
        self.w.write_all(line.as_bytes())?;
        self.w.write_all(b"\n")?;
        self.w.flush()?;
        Ok(())
    }

    pub fn recv(&mut self) -> Result<String> {
        let mut s = String::new();
        match self.r.read_line(&mut s) {
            Ok(0) => Err(err(
                "the peer closed the out-of-band connection (did it fail?)",
            )),
            Ok(_) => Ok(s.trim_end().to_string()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Err(err(
                    "timed out waiting for the peer on the out-of-band connection",
                ))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Receives a line that must start with `word `; returns the rest.
    pub fn expect(&mut self, word: &str) -> Result<String> {
        let l = self.recv()?;
        if let Some(rest) = l.strip_prefix(word) {
            return Ok(rest.trim_start().to_string());
        }
        if let Some(msg) = l.strip_prefix("ERROR ") {
            return Err(err(format!("peer failed: {msg}")));
        }
        Err(err(format!("protocol error: expected '{word}', got '{l}'")))
    }

    /// Both sides send and receive the same token.
    pub fn barrier(&mut self, tag: &str) -> Result<()> {
        self.send(&format!("BARRIER {tag}"))?;
        let got = self.expect("BARRIER")?;
        if got != tag {
            return Err(err(format!(
                "barrier mismatch: at '{tag}', peer at '{got}' (different options on the two sides?)"
            )));
        }
        Ok(())
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn unhex(s: &str) -> Result<Vec<u8>> {
    if s.len() & 1 != 0 {
        return Err(err("odd-length hex address"));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|e| err(format!("bad hex: {e}"))))
        .collect()
}
