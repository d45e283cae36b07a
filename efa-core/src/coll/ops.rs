//! Reduction operators of the reducing collectives (`allreduce`, `reduce`,
//! `reduce_scatter`, `scan`, `exscan`): anything that implements [`Reduction`].
//!
//! * [`ReduceOp`] over every [`Element`] type (MPI 4.0 section 6.9.2);
//! * [`UserOp`]: a user function over `&mut [T], &[T]` for any [`Pod`] `T`, declared
//!   commutative or not (MPI 4.0 section 6.9.5, `MPI_Op_create`);
//! * [`LocOp`] (`MinLoc`, `MaxLoc`) over [`ValueIndex`] pairs (MPI 4.0 section 6.9.4).
//!
//! # Order of operands
//! Every schedule combines in a fixed order, so every rank evaluates the same expression. A
//! non-commutative operator is applied in rank order, `x0 ∘ x1 ∘ ... ∘ x(n-1)` (with some
//! grouping: operators must be associative, as in MPI): allreduce and reduce-scatter then
//! use recursive doubling (never the ring, which starts each block at another rank), and
//! reduce uses a binomial tree rooted at rank 0 whose result rank 0 then sends to the root.

use std::sync::Arc;

use bytemuck::{Pod, Zeroable};
use half::{bf16, f16};

use super::kernel::{self, Accum, Element, Order, ReduceOp};
use crate::error::Result;

/// A reduction operator over elements of type `T`: [`ReduceOp`] (for [`Element`] types),
/// [`UserOp<T>`] or [`LocOp`] (for [`ValueIndex`] pairs). Sealed: user operators are made
/// with [`UserOp`].
pub trait Reduction<T>: private::Kernels<T> + Clone + Send + Sync + 'static {}

pub(crate) mod private {
    use super::Order;
    use crate::error::Result;

    /// Combines byte views of the working buffer.
    pub trait Combine {
        /// Bytes per working element.
        fn elem(&self) -> usize;
        /// `dst = dst ∘ src` ([`Order::DstFirst`]) or `dst = src ∘ dst`, element-wise.
        fn combine(&self, dst: &mut [u8], src: &[u8], order: Order);
        /// `buf[i] /= n` for an average; nothing for other operators.
        fn average(&self, buf: &mut [u8], n: u32);
    }

    /// The body a collective runs over the working bytes.
    pub type WorkFn<'a> = dyn FnMut(&mut [u8], &dyn Combine) -> Result<()> + 'a;

    /// What the collectives need from an operator.
    pub trait Kernels<T> {
        /// (element type code, operator code) for the argument check.
        fn codes(&self) -> (u8, u8);
        /// Whether the operands may be combined in any order.
        fn commutative(&self) -> bool;
        /// Bytes per working element (the accumulator type's).
        fn work_elem(&self) -> usize;
        /// Runs `f` on a byte view of `buf` in the working type (widened and rounded back
        /// once for `f16`/`bf16`), with the combining kernel.
        fn with_work(&self, buf: &mut [T], f: &mut WorkFn<'_>) -> Result<()>;
    }
}
use private::{Combine, Kernels, WorkFn};

/// Element type codes beyond [`kernel::DType`]'s: a user type, and value-index pairs.
pub(crate) const DTYPE_USER: u8 = 11;
pub(crate) const DTYPE_LOC: u8 = 16;
/// Operator codes beyond [`ReduceOp`]'s.
pub(crate) const OP_USER_COMMUTATIVE: u8 = 6;
pub(crate) const OP_USER_ORDERED: u8 = 7;
pub(crate) const OP_MINLOC: u8 = 8;
pub(crate) const OP_MAXLOC: u8 = 9;

struct Builtin<A> {
    op: ReduceOp,
    _a: std::marker::PhantomData<A>,
}

impl<A: Accum> Combine for Builtin<A> {
    fn elem(&self) -> usize {
        std::mem::size_of::<A>()
    }
    fn combine(&self, dst: &mut [u8], src: &[u8], order: Order) {
        kernel::reduce_bytes::<A>(dst, src, self.op, order)
    }
    fn average(&self, buf: &mut [u8], n: u32) {
        if self.op == ReduceOp::Avg {
            A::divide(bytemuck::cast_slice_mut(buf), n);
        }
    }
}

impl<T: Element> Kernels<T> for ReduceOp {
    fn codes(&self) -> (u8, u8) {
        (T::DTYPE.code(), self.code())
    }
    fn commutative(&self) -> bool {
        true
    }
    fn work_elem(&self) -> usize {
        std::mem::size_of::<T::Acc>()
    }
    fn with_work(&self, buf: &mut [T], f: &mut WorkFn<'_>) -> Result<()> {
        let k = Builtin::<T::Acc> {
            op: *self,
            _a: std::marker::PhantomData,
        };
        if let Some(acc) = T::as_acc(buf) {
            return f(bytemuck::cast_slice_mut(acc), &k);
        }
        let mut acc = vec![T::Acc::zeroed(); buf.len()];
        T::to_acc(buf, &mut acc);
        f(bytemuck::cast_slice_mut(&mut acc), &k)?;
        T::from_acc(&acc, buf);
        Ok(())
    }
}
impl<T: Element> Reduction<T> for ReduceOp {}

type UserFn<T> = dyn Fn(&mut [T], &[T]) + Send + Sync;

/// A user-defined reduction operator (`MPI_Op_create`, MPI 4.0 section 6.9.5): a function
/// `f(acc, x)` that sets `acc[i] = acc[i] ∘ x[i]` for every `i` (`acc` is the left operand),
/// and whether `∘` is commutative. It must be associative. `T` is any [`Pod`] type (a
/// struct of several fields, a small matrix, ...); both slices have the same length.
///
/// A non-commutative operator is applied in rank order (see the [module docs](self)), at
/// the cost of the faster ring schedules. Cheap to clone (the function is shared).
///
/// ```
/// # use efa_core::coll::UserOp;
/// // 2x2 matrix product, row-major [a, b, c, d]: not commutative.
/// let matmul = UserOp::<[i64; 4]>::non_commutative(|acc, x| {
///     for (m, y) in acc.iter_mut().zip(x) {
///         *m = [m[0] * y[0] + m[1] * y[2], m[0] * y[1] + m[1] * y[3],
///               m[2] * y[0] + m[3] * y[2], m[2] * y[1] + m[3] * y[3]];
///     }
/// });
/// ```
pub struct UserOp<T> {
    f: Arc<UserFn<T>>,
    commutative: bool,
}

impl<T> Clone for UserOp<T> {
    fn clone(&self) -> Self {
        UserOp {
            f: Arc::clone(&self.f),
            commutative: self.commutative,
        }
    }
}

impl<T> std::fmt::Debug for UserOp<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserOp")
            .field("commutative", &self.commutative)
            .finish_non_exhaustive()
    }
}

impl<T: Pod + Send + Sync> UserOp<T> {
    /// An operator that is commutative (`a ∘ b = b ∘ a`) as well as associative: schedules
    /// may combine in any order (every rank still gets the same result).
    pub fn commutative(f: impl Fn(&mut [T], &[T]) + Send + Sync + 'static) -> UserOp<T> {
        UserOp {
            f: Arc::new(f),
            commutative: true,
        }
    }

    /// An associative operator that is not commutative: applied in rank order.
    pub fn non_commutative(f: impl Fn(&mut [T], &[T]) + Send + Sync + 'static) -> UserOp<T> {
        UserOp {
            f: Arc::new(f),
            commutative: false,
        }
    }

    /// Whether the operator was declared commutative.
    pub fn is_commutative(&self) -> bool {
        self.commutative
    }
}

/// Reads `bytes` as `T`s: in place when aligned, else copied.
fn as_elems<T: Pod>(bytes: &[u8]) -> std::borrow::Cow<'_, [T]> {
    match bytemuck::try_cast_slice::<u8, T>(bytes) {
        Ok(s) => std::borrow::Cow::Borrowed(s),
        Err(_) => {
            let len = bytes.len() / std::mem::size_of::<T>();
            let mut v = vec![T::zeroed(); len];
            bytemuck::cast_slice_mut::<T, u8>(&mut v)
                .copy_from_slice(&bytes[..len * std::mem::size_of::<T>()]);
            std::borrow::Cow::Owned(v)
        }
    }
}

impl<T: Pod + Send + Sync> Combine for UserOp<T> {
    fn elem(&self) -> usize {
        std::mem::size_of::<T>()
    }
    fn combine(&self, dst: &mut [u8], src: &[u8], order: Order) {
        let d: &mut [T] = bytemuck::cast_slice_mut(dst);
        let s = as_elems::<T>(src);
        let len = d.len().min(s.len());
        match order {
            Order::DstFirst => (self.f)(&mut d[..len], &s[..len]),
            Order::SrcFirst => {
                let mut t = s[..len].to_vec();
                (self.f)(&mut t, &d[..len]);
                d[..len].copy_from_slice(&t);
            }
        }
    }
    fn average(&self, _: &mut [u8], _: u32) {}
}

impl<T: Pod + Send + Sync> Kernels<T> for UserOp<T> {
    fn codes(&self) -> (u8, u8) {
        let op = if self.commutative {
            OP_USER_COMMUTATIVE
        } else {
            OP_USER_ORDERED
        };
        (DTYPE_USER, op)
    }
    fn commutative(&self) -> bool {
        self.commutative
    }
    fn work_elem(&self) -> usize {
        std::mem::size_of::<T>()
    }
    fn with_work(&self, buf: &mut [T], f: &mut WorkFn<'_>) -> Result<()> {
        f(bytemuck::cast_slice_mut(buf), self)
    }
}
impl<T: Pod + Send + Sync> Reduction<T> for UserOp<T> {}

/// Min or max with location (`MPI_MINLOC`/`MPI_MAXLOC`, MPI 4.0 section 6.9.4) over
/// [`ValueIndex`] pairs: the smallest (largest) value and its index; among equal values the
/// lowest index. A float NaN never wins against a number (as [`ReduceOp::Min`] ignores NaN);
/// two NaNs tie. Commutative and associative.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LocOp {
    /// The minimum and the lowest index holding it.
    MinLoc,
    /// The maximum and the lowest index holding it.
    MaxLoc,
}

/// A value and its index, the element of [`LocOp`] reductions: the role of MPI's
/// `MPI_FLOAT_INT`, `MPI_2INT`, ... pairs, but not their layout. Packed (no padding,
/// alignment 1): `size_of` is the value's size + 4 (MPI's `struct { double; int; }` is 16
/// bytes), and the index is unsigned (MPI's is a signed `int`); ties take the lowest index in
/// unsigned order. The C ABI (`efa-capi`) offers MPI's layout and signed indices by converting
/// to and from this type.
/// Fields cannot be borrowed (`&p.index` does not compile); read them by value
/// (`let i = p.index;`) or with [`ValueIndex::value`] and [`ValueIndex::index`].
#[repr(C, packed)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct ValueIndex<V> {
    /// The value compared.
    pub value: V,
    /// Where it came from (a rank, a global element index, ...).
    pub index: u32,
}

impl<V: LocValue> ValueIndex<V> {
    /// A pair.
    pub fn new(value: V, index: u32) -> Self {
        ValueIndex { value, index }
    }
    /// The value (a copy: the struct is packed, so its fields cannot be borrowed).
    pub fn value(&self) -> V {
        self.value
    }
    /// The index.
    pub fn index(&self) -> u32 {
        self.index
    }
}

impl<V: LocValue + std::fmt::Debug> std::fmt::Debug for ValueIndex<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (value, index) = (self.value, self.index);
        write!(f, "({value:?}, {index})")
    }
}

impl<V: LocValue + PartialEq> PartialEq for ValueIndex<V> {
    fn eq(&self, o: &Self) -> bool {
        let (a, b) = (self.value, o.value);
        let (i, j) = (self.index, o.index);
        a == b && i == j
    }
}

/// A value type of [`ValueIndex`]: every [`Element`] type.
pub trait LocValue: Element {
    /// `a` strictly below `b`, where NaN is above every number (so it never wins a min);
    /// two NaNs are equal.
    fn below(a: Self, b: Self) -> bool;
    /// `a` strictly above `b`, where NaN is below every number (so it never wins a max).
    fn above(a: Self, b: Self) -> bool;
    /// Whether the value is a float NaN.
    fn is_nan(self) -> bool;
}

macro_rules! loc_int {
    ($($t:ty),*) => {$(
        impl LocValue for $t {
            fn below(a: $t, b: $t) -> bool { a < b }
            fn above(a: $t, b: $t) -> bool { a > b }
            fn is_nan(self) -> bool { false }
        }
    )*};
}
loc_int!(i8, u8, i32, u32, i64, u64);

macro_rules! loc_float {
    ($($t:ty => $w:expr),*) => {$(
        impl LocValue for $t {
            fn below(a: $t, b: $t) -> bool {
                let (a, b) = ($w(a), $w(b));
                !a.is_nan() && (b.is_nan() || a < b)
            }
            fn above(a: $t, b: $t) -> bool {
                let (a, b) = ($w(a), $w(b));
                !a.is_nan() && (b.is_nan() || a > b)
            }
            fn is_nan(self) -> bool {
                $w(self).is_nan()
            }
        }
    )*};
}
loc_float!(f32 => |x: f32| x, f64 => |x: f64| x, f16 => |x: f16| x.to_f32(),
    bf16 => |x: bf16| x.to_f32());

struct Loc<V> {
    max: bool,
    _v: std::marker::PhantomData<V>,
}

impl<V: LocValue> Loc<V> {
    /// Whether `b` replaces `a`.
    fn wins(&self, a: ValueIndex<V>, b: ValueIndex<V>) -> bool {
        let better = if self.max {
            V::above(b.value, a.value)
        } else {
            V::below(b.value, a.value)
        };
        let worse = if self.max {
            V::above(a.value, b.value)
        } else {
            V::below(a.value, b.value)
        };
        let (ia, ib) = (a.index, b.index);
        better || (!worse && ib < ia)
    }
}

impl<V: LocValue> Combine for Loc<V> {
    fn elem(&self) -> usize {
        std::mem::size_of::<ValueIndex<V>>()
    }
    fn combine(&self, dst: &mut [u8], src: &[u8], _: Order) {
        // Packed: alignment 1, so both casts always succeed. Order does not matter: the
        // winner of a pair is the same whichever comes first.
        let d: &mut [ValueIndex<V>] = bytemuck::cast_slice_mut(dst);
        let s: &[ValueIndex<V>] = bytemuck::cast_slice(src);
        for (a, b) in d.iter_mut().zip(s) {
            if self.wins(*a, *b) {
                *a = *b;
            }
        }
    }
    fn average(&self, _: &mut [u8], _: u32) {}
}

impl<V: LocValue> Kernels<ValueIndex<V>> for LocOp {
    fn codes(&self) -> (u8, u8) {
        let op = match self {
            LocOp::MinLoc => OP_MINLOC,
            LocOp::MaxLoc => OP_MAXLOC,
        };
        (DTYPE_LOC + V::DTYPE.code(), op)
    }
    fn commutative(&self) -> bool {
        true
    }
    fn work_elem(&self) -> usize {
        std::mem::size_of::<ValueIndex<V>>()
    }
    fn with_work(&self, buf: &mut [ValueIndex<V>], f: &mut WorkFn<'_>) -> Result<()> {
        let k = Loc::<V> {
            max: *self == LocOp::MaxLoc,
            _v: std::marker::PhantomData,
        };
        f(bytemuck::cast_slice_mut(buf), &k)
    }
}
impl<V: LocValue> Reduction<ValueIndex<V>> for LocOp {}

/// The serial reference of a [`LocOp`] reduction, element by element, left to right; for
/// tests.
///
/// # Panics
/// If the inputs differ in length (a test's own mistake).
pub fn loc_reference<V: LocValue>(inputs: &[Vec<ValueIndex<V>>], op: LocOp) -> Vec<ValueIndex<V>> {
    let Some(first) = inputs.first() else {
        return Vec::new();
    };
    assert!(inputs.iter().all(|x| x.len() == first.len()));
    (0..first.len())
        .map(|i| {
            let mut best = inputs[0][i];
            for x in &inputs[1..] {
                let c = x[i];
                let (bv, cv) = (best.value, c.value);
                let (bi, ci) = (best.index, c.index);
                // Numbers before NaN; then by value; then the lower index.
                let better = match (bv.is_nan(), cv.is_nan()) {
                    (true, false) => true,
                    (false, true) => false,
                    (true, true) => ci < bi,
                    (false, false) => {
                        let strictly = match op {
                            LocOp::MinLoc => V::below(cv, bv),
                            LocOp::MaxLoc => V::above(cv, bv),
                        };
                        let equal = !V::below(cv, bv) && !V::above(cv, bv);
                        strictly || (equal && ci < bi)
                    }
                };
                if better {
                    best = c;
                }
            }
            best
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vi<V: LocValue>(v: V, i: u32) -> ValueIndex<V> {
        ValueIndex::new(v, i)
    }

    #[test]
    fn minloc_maxloc_ties_take_the_lowest_index() {
        let k = Loc::<i32> {
            max: false,
            _v: std::marker::PhantomData,
        };
        let mut d = vec![vi(3, 5), vi(3, 1), vi(1, 9), vi(7, 0)];
        let s = vec![vi(3, 2), vi(3, 4), vi(2, 0), vi(-1, 8)];
        for o in [Order::DstFirst, Order::SrcFirst] {
            let mut x = d.clone();
            k.combine(
                bytemuck::cast_slice_mut(&mut x),
                bytemuck::cast_slice(&s),
                o,
            );
            assert_eq!(x, [vi(3, 2), vi(3, 1), vi(1, 9), vi(-1, 8)]);
        }
        let k = Loc::<f32> {
            max: true,
            _v: std::marker::PhantomData,
        };
        let mut f = vec![vi(f32::NAN, 0), vi(2.0, 3), vi(f32::NAN, 7)];
        let s = vec![vi(-5.0, 4), vi(f32::NAN, 1), vi(f32::NAN, 2)];
        k.combine(
            bytemuck::cast_slice_mut(&mut f),
            bytemuck::cast_slice(&s),
            Order::DstFirst,
        );
        let got: Vec<(f32, u32)> = f.iter().map(|p| (p.value, p.index)).collect();
        assert_eq!(&got[..2], &[(-5.0, 4), (2.0, 3)]);
        assert!(got[2].0.is_nan() && got[2].1 == 2);
        d.truncate(0);
        assert!(loc_reference::<i32>(&[], LocOp::MinLoc).is_empty());
    }

    #[test]
    fn user_op_operand_order() {
        // Concatenation of decimal digits: not commutative.
        let cat = UserOp::<u64>::non_commutative(|a, x| {
            for (a, x) in a.iter_mut().zip(x) {
                *a = *a * 10 + *x;
            }
        });
        let mut d = vec![1u64, 2];
        cat.combine(
            bytemuck::cast_slice_mut(&mut d),
            bytemuck::cast_slice(&[3u64, 4]),
            Order::DstFirst,
        );
        assert_eq!(d, [13, 24]);
        cat.combine(
            bytemuck::cast_slice_mut(&mut d),
            bytemuck::cast_slice(&[5u64, 6]),
            Order::SrcFirst,
        );
        // dst = src ∘ dst: 5 ∘ 13 and 6 ∘ 24.
        assert_eq!(d, [63, 84]);
        // Unaligned source bytes.
        let mut raw = [0u8; 17];
        raw[1..9].copy_from_slice(&7u64.to_le_bytes());
        let mut d = vec![2u64];
        cat.combine(
            bytemuck::cast_slice_mut(&mut d),
            &raw[1..9],
            Order::DstFirst,
        );
        assert_eq!(d, [27]);
    }
}
