//! A slab of request states: ids are indexes into a `Vec` (no hashing), with a generation
//! in the high bits so that a stale id (a request freed and its slot reused) is told apart.
//! Freed slots are reused last-in first-out, so steady-state traffic allocates nothing.

/// Bits of an id that hold the index (the rest hold the generation).
const INDEX_BITS: u32 = 24;
const INDEX_MASK: u32 = (1 << INDEX_BITS) - 1;
/// Largest number of live entries (16 Mi requests in flight at once).
pub const MAX_ENTRIES: usize = 1 << INDEX_BITS;

/// An entry's id: index (low 24 bits) and generation (high 8 bits). Never 0 for a live
/// entry: generations start at 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(u32);

impl Key {
    /// The slot index, for tables kept alongside the slab.
    pub fn index(self) -> usize {
        (self.0 & INDEX_MASK) as usize
    }
    /// The raw form (for the wire: a rendezvous id).
    pub fn raw(self) -> u32 {
        self.0
    }
    /// A key read back from its raw form (it may be stale: lookups check).
    pub fn from_raw(raw: u32) -> Key {
        Key(raw)
    }
    fn generation(self) -> u32 {
        self.0 >> INDEX_BITS
    }
}

#[derive(Debug)]
struct Entry<T> {
    generation: u32,
    value: Option<T>,
}

/// Values addressed by [`Key`].
#[derive(Debug)]
pub struct Slab<T> {
    entries: Vec<Entry<T>>,
    free: Vec<u32>,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            entries: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Slab<T> {
    /// Stores `value`; `None` when [`MAX_ENTRIES`] are live.
    pub fn insert(&mut self, value: T) -> Option<Key> {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                if self.entries.len() >= MAX_ENTRIES {
                    return None;
                }
                self.entries.push(Entry {
                    generation: 0,
                    value: None,
                });
                (self.entries.len() - 1) as u32
            }
        };
        let e = &mut self.entries[index as usize];
        // Generations run 1..=255, so no live key is 0.
        e.generation = e.generation % 255 + 1;
        e.value = Some(value);
        self.len += 1;
        Some(Key(index | (e.generation << INDEX_BITS)))
    }

    /// The value of a live key.
    pub fn get(&self, k: Key) -> Option<&T> {
        let e = self.entries.get(k.index())?;
        if e.generation != k.generation() {
            return None;
        }
        e.value.as_ref()
    }

    /// The value of a live key, mutably.
    pub fn get_mut(&mut self, k: Key) -> Option<&mut T> {
        let e = self.entries.get_mut(k.index())?;
        if e.generation != k.generation() {
            return None;
        }
        e.value.as_mut()
    }

    /// Removes a live key's value.
    pub fn remove(&mut self, k: Key) -> Option<T> {
        let e = self.entries.get_mut(k.index())?;
        if e.generation != k.generation() {
            return None;
        }
        let v = e.value.take()?;
        self.free.push(k.index() as u32);
        self.len -= 1;
        Some(v)
    }

    /// Number of live entries.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Slots allocated so far (live or free): tables indexed by [`Key::index`] need this many.
    pub fn capacity(&self) -> usize {
        self.entries.len()
    }

    /// Every live entry.
    pub fn iter(&self) -> impl Iterator<Item = (Key, &T)> {
        self.entries.iter().enumerate().filter_map(|(i, e)| {
            e.value
                .as_ref()
                .map(|v| (Key(i as u32 | (e.generation << INDEX_BITS)), v))
        })
    }

    /// Every live entry, mutably.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (Key, &mut T)> {
        self.entries.iter_mut().enumerate().filter_map(|(i, e)| {
            let g = e.generation;
            e.value
                .as_mut()
                .map(move |v| (Key(i as u32 | (g << INDEX_BITS)), v))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_keys_miss_and_slots_are_reused() {
        let mut s = Slab::default();
        let a = s.insert(1).unwrap();
        let b = s.insert(2).unwrap();
        assert_ne!(a, b);
        assert_eq!(s.remove(a), Some(1));
        assert_eq!(s.get(a), None);
        let c = s.insert(3).unwrap();
        assert_eq!(c.index(), a.index(), "slot reused");
        assert_ne!(c, a, "with a new generation");
        assert_eq!(s.get(a), None);
        assert_eq!(s.get(c), Some(&3));
        assert_eq!(s.len(), 2);
        assert_eq!(s.capacity(), 2);
        assert_eq!(Key::from_raw(c.raw()), c);
        for _ in 0..600 {
            let k = s.insert(9).unwrap();
            assert_ne!(k.raw(), 0);
            s.remove(k);
        }
    }
}
