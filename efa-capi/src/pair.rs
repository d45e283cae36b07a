//! The value-index pair datatypes of `EFA_MINLOC` / `EFA_MAXLOC` (`EFA_FLOAT_INT`,
//! `EFA_DOUBLE_INT`, `EFA_LONG_INT`, `EFA_2INT`), laid out as MPI's, and the one conversion
//! between a caller's buffer and the elements efa-core computes on ([`Staged`]).
//!
//! A pair in C memory is MPI's `struct { V value; int index; }` with natural alignment:
//! `efa_double_int` is 16 bytes, `index` at 8, then 4 bytes of tail padding. efa-core's
//! `ValueIndex<V>`, which `LocOp` reduces, is packed with a `u32` index. So a MINLOC/MAXLOC
//! reduction copies the caller's pairs into packed working buffers ([`staged`]), reduces
//! them, and copies the result back ([`unstage`]; for a non-blocking form when the request
//! completes). Every other use of a pair datatype (data movement, user operators) uses the
//! caller's buffer as it is, padding bytes included: user functions see MPI's layout.
//!
//! Indices are signed, as in MPI, and every `int` is allowed: [`key`] maps them onto the
//! `u32` efa-core orders by, preserving order, so among equal values the lowest index in
//! signed order wins (MPI 4.0 section 6.9.4), negative indices included.

use std::borrow::Cow;
use std::ffi::{c_int, c_long};

use bytemuck::{Pod, Zeroable};
use efa_core::ValueIndex;

/// An element of `EFA_FLOAT_INT` (`MPI_FLOAT_INT`): `struct { float value; int index; }`,
/// 8 bytes, `index` at 4.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct efa_float_int {
    /// The value compared.
    pub value: f32,
    /// Where the value came from (a rank, an element index, ...): any `int`, negative ones
    /// included. Among equal values `EFA_MINLOC` and `EFA_MAXLOC` keep the lowest index
    /// (signed order, as MPI).
    pub index: c_int,
}

/// An element of `EFA_DOUBLE_INT` (`MPI_DOUBLE_INT`): `struct { double value; int index; }`
/// with natural alignment, as MPI's: 16 bytes (alignment 8), `index` at 8, then 4 bytes of
/// padding. `EFA_MINLOC`/`EFA_MAXLOC` neither read nor write the padding; other calls (a
/// broadcast, a user operator) copy it as it is.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct efa_double_int {
    /// The value compared.
    pub value: f64,
    /// As in [`efa_float_int`].
    pub index: c_int,
}

/// An element of `EFA_LONG_INT` (`MPI_LONG_INT`): `struct { long value; int index; }`, 16
/// bytes on 64-bit Linux (alignment 8), `index` at 8, then 4 bytes of padding, as
/// [`efa_double_int`].
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct efa_long_int {
    /// The value compared.
    pub value: c_long,
    /// As in [`efa_float_int`].
    pub index: c_int,
}

/// An element of `EFA_2INT` (`MPI_2INT`): `struct { int value; int index; }`, 8 bytes,
/// `index` at 4.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct efa_2int {
    /// The value compared.
    pub value: c_int,
    /// As in [`efa_float_int`].
    pub index: c_int,
}

/// The `u32` efa-core orders an index by: the sign bit flipped, so that the unsigned order
/// of keys is the signed order of indices (`i32::MIN` -> 0, -1 -> `0x7fff_ffff`, 0 ->
/// `0x8000_0000`) and efa-core's "lowest index wins" is MPI's. [`index_of`] inverts it.
pub(crate) fn key(index: c_int) -> u32 {
    (index as u32) ^ 0x8000_0000
}

/// The index of a [`key`].
pub(crate) fn index_of(key: u32) -> c_int {
    (key ^ 0x8000_0000) as c_int
}

/// How the elements of a datatype in the caller's memory ([`Staged::C`]) become the
/// elements efa-core computes on (`Self`). The same type, used in place, for every datatype
/// and operator except `EFA_MINLOC`/`EFA_MAXLOC` over pairs, which compute on packed
/// `ValueIndex` copies. The collectives go through [`staged`], [`with_staged`] and
/// [`unstage`] only, blocking and non-blocking alike.
pub(crate) trait Staged: Pod + Send + Sync {
    /// The element as the caller lays it out (what buffer checks and counts refer to).
    type C: Pod;
    /// The caller's elements themselves, when they need no conversion.
    fn direct(c: &mut [Self::C]) -> Option<&mut [Self]>;
    /// [`Staged::direct`] for reading.
    fn direct_ref(c: &[Self::C]) -> Option<&[Self]>;
    /// One element in.
    fn stage(c: &Self::C) -> Self;
    /// One element out: writes the fields [`Staged::stage`] read, and nothing else.
    fn unstage(self, c: &mut Self::C);
}

/// The caller's elements `c` as efa-core's: borrowed when they need no conversion, else a
/// converted copy.
pub(crate) fn staged<T: Staged>(c: &[T::C]) -> Cow<'_, [T]> {
    match T::direct_ref(c) {
        Some(w) => Cow::Borrowed(w),
        None => Cow::Owned(c.iter().map(T::stage).collect()),
    }
}

/// Writes efa-core's elements `w` back into the caller's `c` (as many as both hold).
pub(crate) fn unstage<T: Staged>(w: &[T], c: &mut [T::C]) {
    for (w, c) in w.iter().zip(c) {
        w.unstage(c);
    }
}

/// Runs `f` over the caller's elements `c` as efa-core's: `c` itself, or a converted copy
/// that is written back when `f` succeeds (on an error `c` is left as it was).
pub(crate) fn with_staged<T: Staged, R>(
    c: &mut [T::C],
    f: impl FnOnce(&mut [T]) -> efa_core::Result<R>,
) -> efa_core::Result<R> {
    if let Some(w) = T::direct(c) {
        return f(w);
    }
    let mut w = staged::<T>(c).into_owned();
    let r = f(&mut w)?;
    unstage(&w, c);
    Ok(r)
}

/// Types used as they are: efa-core's elements and the pairs' [`Pod`] twins.
macro_rules! direct {
    ($($t:ty),*) => {$(
        impl Staged for $t {
            type C = $t;
            fn direct(c: &mut [$t]) -> Option<&mut [$t]> {
                Some(c)
            }
            fn direct_ref(c: &[$t]) -> Option<&[$t]> {
                Some(c)
            }
            fn stage(c: &$t) -> $t {
                *c
            }
            fn unstage(self, c: &mut $t) {
                *c = self;
            }
        }
    )*};
}
direct!(
    i8,
    u8,
    i32,
    u32,
    i64,
    u64,
    efa_core::f16,
    efa_core::bf16,
    f32,
    f64
);

/// For each pair: its [`Pod`] twin `$bits` (the C type's bytes, the tail padding as a field:
/// what data movement and user operators see, and what `match_type!` maps the datatype to),
/// compile-time checks that the twin has the C type's layout (size, alignment, offsets),
/// the twin used in place, and `ValueIndex<$v>` staged from the twin for `EFA_MINLOC`/`EFA_MAXLOC`.
macro_rules! pairs {
    ($($c:ident => $bits:ident { value: $v:ty $(, pad: $pad:ty)? }),*) => {$(
        #[doc = concat!("The bytes of a [`", stringify!($c), "`], padding included.")]
        #[repr(C)]
        #[derive(Debug, Clone, Copy, Pod, Zeroable)]
        pub(crate) struct $bits {
            value: $v,
            index: c_int,
            $(_pad: $pad,)?
        }

        const _: () = {
            use std::mem::{align_of, offset_of, size_of};
            assert!(size_of::<$c>() == size_of::<$bits>());
            assert!(align_of::<$c>() == align_of::<$bits>());
            assert!(offset_of!($c, value) == offset_of!($bits, value));
            assert!(offset_of!($c, index) == offset_of!($bits, index));
        };

        direct!($bits);

        impl Staged for ValueIndex<$v> {
            type C = $bits;
            fn direct(_: &mut [$bits]) -> Option<&mut [Self]> {
                None
            }
            fn direct_ref(_: &[$bits]) -> Option<&[Self]> {
                None
            }
            fn stage(c: &$bits) -> Self {
                ValueIndex { value: c.value, index: key(c.index) }
            }
            fn unstage(self, c: &mut $bits) {
                c.value = self.value;
                c.index = index_of(self.index);
            }
        }
    )*};
}
pairs!(
    efa_float_int => FloatIntBits { value: f32 },
    efa_double_int => DoubleIntBits { value: f64, pad: u32 },
    efa_long_int => LongIntBits { value: i64, pad: u32 },
    efa_2int => TwoIntBits { value: i32 }
);

// MPI's layouts (what a program's own `struct { double; int; }` has on the 64-bit targets
// libefa supports): a build where they differ fails here.
const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<efa_float_int>() == 8 && offset_of!(efa_float_int, index) == 4);
    assert!(size_of::<efa_double_int>() == 16 && offset_of!(efa_double_int, index) == 8);
    assert!(size_of::<efa_long_int>() == 16 && offset_of!(efa_long_int, index) == 8);
    assert!(size_of::<efa_2int>() == 8 && offset_of!(efa_2int, index) == 4);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_order_indices_as_signed_ints_and_invert() {
        let idx = [
            i32::MIN,
            i32::MIN + 1,
            -2,
            -1,
            0,
            1,
            2,
            i32::MAX - 1,
            i32::MAX,
        ];
        for w in idx.windows(2) {
            assert!(key(w[0]) < key(w[1]), "{} vs {}", w[0], w[1]);
        }
        for i in idx {
            assert_eq!(index_of(key(i)), i);
        }
        assert_eq!(key(i32::MIN), 0);
        assert_eq!(key(-1), 0x7fff_ffff);
        assert_eq!(key(0), 0x8000_0000);
    }

    #[test]
    fn a_pair_is_staged_and_written_back_without_touching_the_padding() {
        let mut c = [
            DoubleIntBits {
                value: 2.5,
                index: -7,
                _pad: 0xdead_beef,
            },
            DoubleIntBits {
                value: -1.0,
                index: i32::MAX,
                _pad: 0x1234_5678,
            },
        ];
        let w = staged::<ValueIndex<f64>>(&c).into_owned();
        let (v0, k0, k1) = (w[0].value, w[0].index, w[1].index);
        assert_eq!((v0, k0, k1), (2.5, key(-7), key(i32::MAX)));
        let out = [ValueIndex::new(9.0, key(-3)), ValueIndex::new(8.0, key(4))];
        unstage(&out, &mut c);
        assert_eq!((c[0].value, c[0].index, c[0]._pad), (9.0, -3, 0xdead_beef));
        assert_eq!((c[1].value, c[1].index, c[1]._pad), (8.0, 4, 0x1234_5678));
        // On an error nothing is written back.
        let before = (c[0].value, c[0].index);
        let r = with_staged::<ValueIndex<f64>, ()>(&mut c, |w| {
            w[0] = ValueIndex::new(0.0, 0);
            Err(efa_core::Error::Internal { what: "test" })
        });
        assert!(r.is_err());
        assert_eq!((c[0].value, c[0].index), before);
        // Plain types and the twins are used in place: no copy.
        let mut d = [1.0f64, 2.0];
        let p = d.as_ptr();
        with_staged::<f64, ()>(&mut d, |w| {
            assert_eq!(w.as_ptr(), p);
            Ok(())
        })
        .unwrap();
    }
}
