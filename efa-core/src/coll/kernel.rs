//! Element types, reduction operators and the reduction kernels.
//!
//! The kernels are plain loops over zipped slices, which LLVM turns into SIMD code for every
//! type (check with `cargo test --release -p efa-core --lib kernel_speed -- --ignored
//! --nocapture`, which prints GB/s next to a memcpy of the same size).
//!
//! `f16` and `bf16` are reduced in `f32` (their [`Element::Acc`] type): the input is widened
//! once, every partial sum of the whole schedule is an `f32` (and travels as `f32` on the
//! wire, so these types move twice the bytes), and the final result is rounded once.

use bytemuck::Pod;
use half::{bf16, f16};

/// A reduction operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    /// Sum (wrapping for integers).
    Sum,
    /// Product (wrapping for integers).
    Prod,
    /// Minimum (for floats, NaN is ignored unless all inputs are NaN, like `f32::min`).
    Min,
    /// Maximum (NaN as for [`ReduceOp::Min`]).
    Max,
    /// Sum, then divided by the number of ranks once at the end (integer division for integer
    /// types). For averaging gradients.
    Avg,
}

impl ReduceOp {
    pub(crate) fn code(self) -> u8 {
        match self {
            ReduceOp::Sum => 1,
            ReduceOp::Prod => 2,
            ReduceOp::Min => 3,
            ReduceOp::Max => 4,
            ReduceOp::Avg => 5,
        }
    }
    /// The operator applied while combining partial results (`Avg` combines by `Sum`).
    pub(crate) fn combine(self) -> ReduceOp {
        match self {
            ReduceOp::Avg => ReduceOp::Sum,
            o => o,
        }
    }
}

/// Element type code (part of every collective's argument check).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum DType {
    I8,
    U8,
    I32,
    U32,
    I64,
    U64,
    F16,
    Bf16,
    F32,
    F64,
}

impl DType {
    pub(crate) fn code(self) -> u8 {
        self as u8 + 1
    }
}

/// Which operand comes first when combining: `Dst` means `dst = dst ⊕ src`, `Src` means
/// `dst = src ⊕ dst`. Schedules fix this so that every rank evaluates the same expression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// `dst = dst ⊕ src`.
    DstFirst,
    /// `dst = src ⊕ dst`.
    SrcFirst,
}

mod sealed {
    pub trait Sealed {}
}

/// A type in which partial results are computed and sent: the element type itself, or
/// `f32` for `f16`/`bf16`.
pub trait Accum: Pod + Send + Sync + sealed::Sealed {
    /// `dst = dst ⊕ src` (or `src ⊕ dst`, see [`Order`]) element-wise.
    fn reduce(dst: &mut [Self], src: &[Self], op: ReduceOp, order: Order);
    /// `buf[i] /= n` (the final step of [`ReduceOp::Avg`]).
    fn divide(buf: &mut [Self], n: u32);
}

/// An element type of the collectives. Implemented for `i8`, `u8`, `i32`, `u32`, `i64`,
/// `u64`, `f32`, `f64`, [`half::f16`] and [`half::bf16`].
pub trait Element: Pod + Send + Sync + sealed::Sealed {
    /// This type's code.
    const DTYPE: DType;
    /// The type partial results are computed in.
    type Acc: Accum;
    /// The buffer itself when `Acc == Self` (no conversion needed).
    fn as_acc(buf: &mut [Self]) -> Option<&mut [Self::Acc]>;
    /// Widens `src` into `dst` (same length).
    fn to_acc(src: &[Self], dst: &mut [Self::Acc]);
    /// Rounds `src` into `dst` (same length).
    fn from_acc(src: &[Self::Acc], dst: &mut [Self]);
}

macro_rules! int_accum {
    ($($t:ident => $code:ident),*) => {$(
        impl sealed::Sealed for $t {}
        impl Accum for $t {
            #[inline(never)]
            fn reduce(dst: &mut [$t], src: &[$t], op: ReduceOp, order: Order) {
                let n = dst.len().min(src.len());
                let (dst, src) = (&mut dst[..n], &src[..n]);
                // Integer ops are commutative bit for bit, so the order does not matter.
                let _ = order;
                match op.combine() {
                    ReduceOp::Sum | ReduceOp::Avg => {
                        dst.iter_mut().zip(src).for_each(|(a, b)| *a = a.wrapping_add(*b))
                    }
                    ReduceOp::Prod => {
                        dst.iter_mut().zip(src).for_each(|(a, b)| *a = a.wrapping_mul(*b))
                    }
                    ReduceOp::Min => dst.iter_mut().zip(src).for_each(|(a, b)| *a = (*a).min(*b)),
                    ReduceOp::Max => dst.iter_mut().zip(src).for_each(|(a, b)| *a = (*a).max(*b)),
                }
            }
            fn divide(buf: &mut [$t], n: u32) {
                // In i128, where every integer type and every rank count fit: `n as $t` is
                // wrong once n exceeds the type (an i8 average over 200 ranks divided by -56,
                // a u8 one over 256 ranks by 0, so not at all).
                if n > 1 {
                    let d = i128::from(n);
                    buf.iter_mut().for_each(|a| *a = (i128::from(*a) / d) as $t);
                }
            }
        }
        impl Element for $t {
            const DTYPE: DType = DType::$code;
            type Acc = $t;
            fn as_acc(buf: &mut [$t]) -> Option<&mut [$t]> {
                Some(buf)
            }
            fn to_acc(src: &[$t], dst: &mut [$t]) {
                dst.copy_from_slice(src)
            }
            fn from_acc(src: &[$t], dst: &mut [$t]) {
                dst.copy_from_slice(src)
            }
        }
    )*};
}
int_accum!(i8 => I8, u8 => U8, i32 => I32, u32 => U32, i64 => I64, u64 => U64);

macro_rules! float_accum {
    ($($t:ident => $code:ident),*) => {$(
        impl sealed::Sealed for $t {}
        impl Accum for $t {
            #[inline(never)]
            #[allow(clippy::assign_op_pattern)] // the operand order is the point
            fn reduce(dst: &mut [$t], src: &[$t], op: ReduceOp, order: Order) {
                let n = dst.len().min(src.len());
                let (dst, src) = (&mut dst[..n], &src[..n]);
                let z = dst.iter_mut().zip(src);
                match (op.combine(), order) {
                    (ReduceOp::Sum | ReduceOp::Avg, Order::DstFirst) => z.for_each(|(a, b)| *a += *b),
                    (ReduceOp::Sum | ReduceOp::Avg, Order::SrcFirst) => z.for_each(|(a, b)| *a = *b + *a),
                    (ReduceOp::Prod, Order::DstFirst) => z.for_each(|(a, b)| *a *= *b),
                    (ReduceOp::Prod, Order::SrcFirst) => z.for_each(|(a, b)| *a = *b * *a),
                    (ReduceOp::Min, Order::DstFirst) => z.for_each(|(a, b)| *a = a.min(*b)),
                    (ReduceOp::Min, Order::SrcFirst) => z.for_each(|(a, b)| *a = b.min(*a)),
                    (ReduceOp::Max, Order::DstFirst) => z.for_each(|(a, b)| *a = a.max(*b)),
                    (ReduceOp::Max, Order::SrcFirst) => z.for_each(|(a, b)| *a = b.max(*a)),
                }
            }
            fn divide(buf: &mut [$t], n: u32) {
                let d = n as $t;
                buf.iter_mut().for_each(|a| *a /= d);
            }
        }
        impl Element for $t {
            const DTYPE: DType = DType::$code;
            type Acc = $t;
            fn as_acc(buf: &mut [$t]) -> Option<&mut [$t]> {
                Some(buf)
            }
            fn to_acc(src: &[$t], dst: &mut [$t]) {
                dst.copy_from_slice(src)
            }
            fn from_acc(src: &[$t], dst: &mut [$t]) {
                dst.copy_from_slice(src)
            }
        }
    )*};
}
float_accum!(f32 => F32, f64 => F64);

macro_rules! half_elem {
    ($($t:ident => $code:ident),*) => {$(
        impl sealed::Sealed for $t {}
        impl Element for $t {
            const DTYPE: DType = DType::$code;
            type Acc = f32;
            fn as_acc(_: &mut [$t]) -> Option<&mut [f32]> {
                None
            }
            fn to_acc(src: &[$t], dst: &mut [f32]) {
                dst.iter_mut().zip(src).for_each(|(d, s)| *d = s.to_f32());
            }
            fn from_acc(src: &[f32], dst: &mut [$t]) {
                dst.iter_mut().zip(src).for_each(|(d, s)| *d = $t::from_f32(*s));
            }
        }
    )*};
}
half_elem!(f16 => F16, bf16 => Bf16);

/// Reduces `src` into `dst` where both are byte views of `A` slices; `src` may be unaligned
/// (then it is copied into an aligned scratch buffer first).
pub(crate) fn reduce_bytes<A: Accum>(dst: &mut [u8], src: &[u8], op: ReduceOp, order: Order) {
    let d: &mut [A] = bytemuck::cast_slice_mut(dst);
    match bytemuck::try_cast_slice::<u8, A>(src) {
        Ok(s) => A::reduce(d, s, op, order),
        Err(_) => {
            let len = src.len() / std::mem::size_of::<A>();
            let mut s = vec![A::zeroed(); len];
            bytemuck::cast_slice_mut::<A, u8>(&mut s)
                .copy_from_slice(&src[..len * std::mem::size_of::<A>()]);
            A::reduce(d, &s, op, order)
        }
    }
}

/// The serial reference: `inputs[0] ⊕ inputs[1] ⊕ ...` left to right, then the average's
/// division; for tests.
///
/// It shares no code with the reduction kernels ([`Accum::reduce`], [`Accum::divide`]): each
/// element is reduced one at a time by the plain scalar rules of [`ReduceOp`], so that a test
/// comparing a collective's result with this one checks the kernels against an independent
/// implementation. The rules: integers wrap (sum, product), and an integer average is the
/// wrapped sum divided by the number of inputs, rounded toward zero; `f32` and `f64` are
/// reduced in their own type, `f16` and `bf16` in `f32` and rounded once at the end; a float
/// min or max ignores NaN unless every input is NaN.
///
/// # Panics
/// If the inputs differ in length (a test's own mistake).
pub fn reference<T: Element>(inputs: &[Vec<T>], op: ReduceOp) -> Vec<T> {
    let Some(first) = inputs.first() else {
        return Vec::new();
    };
    assert!(
        inputs.iter().all(|x| x.len() == first.len()),
        "reference: inputs of different lengths"
    );
    let n = inputs.len();
    let mut out = first.clone();
    macro_rules! ints {
        ($t:ty) => {{
            let ins: Vec<&[$t]> = inputs.iter().map(|x| bytemuck::cast_slice(x)).collect();
            let dst: &mut [$t] = bytemuck::cast_slice_mut(&mut out);
            for (i, d) in dst.iter_mut().enumerate() {
                let mut acc: $t = ins[0][i];
                for x in &ins[1..] {
                    let v: $t = x[i];
                    acc = match op {
                        ReduceOp::Sum | ReduceOp::Avg => acc.wrapping_add(v),
                        ReduceOp::Prod => acc.wrapping_mul(v),
                        ReduceOp::Min => {
                            if v < acc {
                                v
                            } else {
                                acc
                            }
                        }
                        ReduceOp::Max => {
                            if v > acc {
                                v
                            } else {
                                acc
                            }
                        }
                    };
                }
                if op == ReduceOp::Avg {
                    // Rounded toward zero, in a type wide enough for every rank count.
                    acc = (i128::from(acc) / n as i128) as $t;
                }
                *d = acc;
            }
        }};
    }
    macro_rules! floats {
        ($t:ty, $acc:ty, $widen:expr, $narrow:expr) => {{
            let ins: Vec<&[$t]> = inputs.iter().map(|x| bytemuck::cast_slice(x)).collect();
            let dst: &mut [$t] = bytemuck::cast_slice_mut(&mut out);
            for (i, d) in dst.iter_mut().enumerate() {
                let mut acc: $acc = $widen(ins[0][i]);
                for x in &ins[1..] {
                    let v: $acc = $widen(x[i]);
                    acc = match op {
                        ReduceOp::Sum | ReduceOp::Avg => acc + v,
                        ReduceOp::Prod => acc * v,
                        ReduceOp::Min => {
                            if acc.is_nan() || v < acc {
                                v
                            } else {
                                acc
                            }
                        }
                        ReduceOp::Max => {
                            if acc.is_nan() || v > acc {
                                v
                            } else {
                                acc
                            }
                        }
                    };
                }
                if op == ReduceOp::Avg {
                    acc /= n as $acc;
                }
                *d = $narrow(acc);
            }
        }};
    }
    match T::DTYPE {
        DType::I8 => ints!(i8),
        DType::U8 => ints!(u8),
        DType::I32 => ints!(i32),
        DType::U32 => ints!(u32),
        DType::I64 => ints!(i64),
        DType::U64 => ints!(u64),
        DType::F32 => floats!(f32, f32, |x: f32| x, |x: f32| x),
        DType::F64 => floats!(f64, f64, |x: f64| x, |x: f64| x),
        DType::F16 => floats!(f16, f32, |x: f16| x.to_f32(), f16::from_f32),
        DType::Bf16 => floats!(bf16, f32, |x: bf16| x.to_f32(), bf16::from_f32),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_average_over_more_ranks_than_the_type_holds() {
        // 200 ranks averaging i8 values of 1 each: the sum wraps to -56, and -56 / 200 = 0.
        let mut v = [-56i8, 100, -128];
        i8::divide(&mut v, 200);
        assert_eq!(v, [0, 0, 0]);
        let mut v = [127i8, -127];
        i8::divide(&mut v, 100);
        assert_eq!(v, [1, -1]);
        // 256 and 300 ranks over u8: `256 as u8` is 0, which used to skip the division.
        let mut v = [255u8, 10];
        u8::divide(&mut v, 256);
        assert_eq!(v, [0, 0]);
        let mut v = [200u8];
        u8::divide(&mut v, 100);
        assert_eq!(v, [2]);
        let mut v = [u64::MAX, i64::MAX as u64];
        u64::divide(&mut v, 3);
        assert_eq!(v, [u64::MAX / 3, i64::MAX as u64 / 3]);
        let mut v = [i64::MIN, -7];
        i64::divide(&mut v, 2);
        assert_eq!(v, [i64::MIN / 2, -3]);
    }
    use std::time::Instant;

    #[test]
    fn ops_on_each_type() {
        let mut a = vec![1i8, 100, -5];
        i8::reduce(&mut a, &[2, 100, 3], ReduceOp::Sum, Order::DstFirst);
        assert_eq!(a, [3, -56, -2]);
        let mut f = vec![1.0f32, 5.0, f32::NAN];
        f32::reduce(&mut f, &[2.0, 3.0, 1.0], ReduceOp::Min, Order::DstFirst);
        assert_eq!(f, [1.0, 3.0, 1.0]);
        let mut u = vec![7u64, 9];
        u64::reduce(&mut u, &[3, 2], ReduceOp::Prod, Order::SrcFirst);
        assert_eq!(u, [21, 18]);
        u64::divide(&mut u, 4);
        assert_eq!(u, [5, 4]);
        let r = reference(
            &[
                vec![f16::from_f32(1.0), f16::from_f32(2048.0)],
                vec![f16::from_f32(2.0), f16::from_f32(1.0)],
                vec![f16::from_f32(3.0), f16::from_f32(1.0)],
            ],
            ReduceOp::Avg,
        );
        // 2048 + 1 + 1 = 2050 in f32 (f16 would round 2048 + 1 to 2048 twice), / 3, rounded once.
        assert_eq!(r, [f16::from_f32(2.0), f16::from_f32(2050.0 / 3.0)]);
        let r = reference(
            &[vec![bf16::from_f32(1.5)], vec![bf16::from_f32(-4.0)]],
            ReduceOp::Max,
        );
        assert_eq!(r, [bf16::from_f32(1.5)]);
    }

    #[test]
    fn unaligned_source_is_handled() {
        let src: Vec<u8> = (0..33u8).collect();
        let mut dst = vec![0u32; 8];
        reduce_bytes::<u32>(
            bytemuck::cast_slice_mut(&mut dst),
            &src[1..33],
            ReduceOp::Sum,
            Order::DstFirst,
        );
        assert_eq!(dst[0], u32::from_le_bytes([1, 2, 3, 4]));
    }

    fn gbps(bytes: usize, reps: usize, t: std::time::Duration) -> f64 {
        (bytes * reps) as f64 / t.as_secs_f64() / 1e9
    }

    /// Reduction speed vs memcpy, per core. Run in release:
    /// `cargo test --release -p efa-core --lib kernel_speed -- --ignored --nocapture`.
    #[test]
    #[ignore = "micro-benchmark; run in --release"]
    fn kernel_speed() {
        for bytes in [64 << 10, 1 << 20, 16 << 20] {
            let n = bytes / 4;
            let src = vec![1.0f32; n];
            let mut dst = vec![2.0f32; n];
            let reps = (256 << 20) / bytes;
            let t = Instant::now();
            for _ in 0..reps {
                dst.copy_from_slice(std::hint::black_box(&src));
            }
            let mc = gbps(bytes, reps, t.elapsed());
            let t = Instant::now();
            for _ in 0..reps {
                f32::reduce(
                    &mut dst,
                    std::hint::black_box(&src),
                    ReduceOp::Sum,
                    Order::DstFirst,
                );
            }
            let rs = gbps(bytes, reps, t.elapsed());
            let srci = vec![1i64; n / 2];
            let mut dsti = vec![2i64; n / 2];
            let t = Instant::now();
            for _ in 0..reps {
                i64::reduce(
                    &mut dsti,
                    std::hint::black_box(&srci),
                    ReduceOp::Max,
                    Order::DstFirst,
                );
            }
            let ri = gbps(bytes, reps, t.elapsed());
            let hsrc = vec![f16::from_f32(1.0); n];
            let mut hacc = vec![0f32; n];
            let t = Instant::now();
            for _ in 0..reps {
                f16::to_acc(std::hint::black_box(&hsrc), &mut hacc);
            }
            let h = gbps(bytes, reps, t.elapsed());
            println!(
                "{:>9} B  memcpy {mc:6.2} GB/s  f32 sum {rs:6.2} GB/s  i64 max {ri:6.2} GB/s  f16->f32 {h:6.2} GB/s (bytes of dst per second)",
                bytes
            );
            std::hint::black_box((&dst, &dsti, &hacc));
        }
    }
}
