// Memory peers write (a TargetBuf) is never lent out as a slice: bytes are copied out.
use efa_fabric::TargetBuf;

fn peek(t: &TargetBuf) -> u8 {
    let bytes: &[u8] = t;
    bytes[0]
}

fn main() {}
