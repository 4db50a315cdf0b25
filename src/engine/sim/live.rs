//! The live system: the LVs on the PV, how busy the writer and the reader are, and what
//! they expect of every sector.

use crate::core::facts::TableLineFacts;
use crate::core::tables::DevRef;
use std::fmt::Write as _;

/// How a logical volume maps onto the PV (in PV sectors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Linear { pv: u64 },
    Striped { chunk: u64, pvs: Vec<u64> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lv {
    pub name: String,
    /// (LV start, length, mapping).
    pub segs: Vec<(u64, u64, Seg)>,
}

impl Lv {
    pub fn len(&self) -> u64 {
        self.segs.last().map(|s| s.0 + s.1).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// PV sector of LV sector `o`.
    pub fn pv(&self, o: u64) -> u64 {
        for (start, len, seg) in &self.segs {
            if o >= *start && o < start + len {
                let r = o - start;
                return match seg {
                    Seg::Linear { pv } => pv + r,
                    Seg::Striped { chunk, pvs } => {
                        let c = r / chunk;
                        let n = pvs.len() as u64;
                        pvs[(c % n) as usize] + (c / n) * chunk + r % chunk
                    }
                };
            }
        }
        panic!("LV sector {o} beyond {}", self.name);
    }

    /// The dm table of the LV on device `on` (LVM's own lines).
    pub fn table(&self, on: DevRef) -> Vec<TableLineFacts> {
        self.segs
            .iter()
            .map(|(start, len, seg)| match seg {
                Seg::Linear { pv } => TableLineFacts {
                    start: *start,
                    length: *len,
                    target_type: "linear".into(),
                    params: format!("{on} {pv}"),
                },
                Seg::Striped { chunk, pvs } => {
                    let mut p = format!("{} {chunk}", pvs.len());
                    for o in pvs {
                        let _ = write!(p, " {on} {o}");
                    }
                    TableLineFacts { start: *start, length: *len, target_type: "striped".into(), params: p }
                }
            })
            .collect()
    }
}

/// How busy the live system is: probabilities per operation of the engine.
#[derive(Debug, Clone, PartialEq)]
pub struct WriterConfig {
    /// Issue a write of 1..=max_len sectors through an LV.
    pub p_write: f64,
    /// Then fsync (flush through the LV; acknowledges every write issued before).
    pub p_flush: f64,
    /// Read random sectors through the LVs and check them against the latest writes.
    pub p_read: f64,
    /// Write/read LVM metadata sectors [0, pe_start) (not the label) through the PV device.
    pub p_meta: f64,
    /// Fraction of writes aimed at the chunk being moved (or just moved).
    pub p_hot: f64,
    /// Let the kernel copy one mirror region in the background.
    pub p_recover: f64,
    pub max_len: u64,
    /// LVM writes into the label sectors [0, F) when it sees the PV on the raw device (a
    /// label rewrite). With the PV seen through the bridge it always may.
    pub raw_label_area: bool,
}

impl WriterConfig {
    pub fn busy() -> WriterConfig {
        WriterConfig {
            p_write: 0.5,
            p_flush: 0.3,
            p_read: 0.3,
            p_meta: 0.08,
            p_hot: 0.6,
            p_recover: 0.15,
            max_len: 4,
            raw_label_area: false,
        }
    }
    pub fn off() -> WriterConfig {
        WriterConfig {
            p_write: 0.0,
            p_flush: 0.0,
            p_read: 0.0,
            p_meta: 0.0,
            p_hot: 0.0,
            p_recover: 0.0,
            max_len: 1,
            raw_label_area: true,
        }
    }
    /// LVM metadata writes (including the label sectors [0, F)) and fsyncs at every turn.
    pub fn meta_heavy() -> WriterConfig {
        WriterConfig {
            p_write: 0.2,
            p_flush: 1.0,
            p_read: 0.3,
            p_meta: 1.0,
            p_hot: 0.5,
            p_recover: 0.1,
            max_len: 2,
            raw_label_area: true,
        }
    }
    /// Writes and fsyncs before every operation, aimed at the chunk in flight.
    pub fn relentless() -> WriterConfig {
        WriterConfig {
            p_write: 1.0,
            p_flush: 1.0,
            p_read: 0.5,
            p_meta: 0.2,
            p_hot: 0.9,
            p_recover: 0.0,
            max_len: 4,
            raw_label_area: false,
        }
    }
}

/// What the live system expects of every plaintext sector of the PV, [0, L).
#[derive(Clone)]
pub struct Model {
    /// What the disk durably holds, as far as the live system knows: one write id (0 = the
    /// original content), the last acknowledged one; after a power cut, every write that may
    /// have survived, until a read tells which one did.
    pub base: Vec<Vec<u64>>,
    /// Ids of writes issued since, in order.
    pub pending: Vec<Vec<u64>>,
    pub next_id: u64,
    pub writes: u64,
    pub acks: u64,
    pub reads_checked: u64,
}

impl Model {
    pub(super) fn new(l: u64) -> Model {
        Model {
            base: vec![vec![0]; l as usize],
            pending: vec![Vec::new(); l as usize],
            next_id: 1,
            writes: 0,
            acks: 0,
            reads_checked: 0,
        }
    }
    /// What a read must return now: one id, or (after a power cut, not yet read) any of several.
    pub fn latest(&self, x: u64) -> Vec<u64> {
        match self.pending[x as usize].last() {
            Some(&id) => vec![id],
            None => self.base[x as usize].clone(),
        }
    }
    /// What the disk may hold after a power cut now.
    pub fn allowed(&self, x: u64) -> Vec<u64> {
        let mut v = self.base[x as usize].clone();
        v.extend(&self.pending[x as usize]);
        v
    }
    /// The acknowledged write of `x`, if it is known and not the original content.
    pub fn acked(&self, x: u64) -> Option<u64> {
        match self.base[x as usize][..] {
            [id] if id != 0 => Some(id),
            _ => None,
        }
    }
    pub(super) fn ack_all(&mut self) {
        for (a, p) in self.base.iter_mut().zip(self.pending.iter_mut()) {
            if let Some(&last) = p.last() {
                *a = vec![last];
                p.clear();
            }
        }
        self.acks += 1;
    }
    /// A read saw `id` on a sector with nothing pending: that is what survived.
    pub(super) fn observed(&mut self, x: u64, id: u64) {
        if self.pending[x as usize].is_empty() {
            self.base[x as usize] = vec![id];
        }
    }
    /// The power went: each sector now holds one of the writes that may have survived.
    pub(super) fn power_cut(&mut self) {
        for (a, p) in self.base.iter_mut().zip(self.pending.iter_mut()) {
            a.append(p);
        }
    }
}

/// The live system: LVs active on some device, the writer, the reader.
#[derive(Clone)]
pub struct Live {
    /// Device the LVs are mapped onto (raw, or the bridge once rerouted by a fresh activation).
    pub on: DevRef,
    /// Whether the LVs are active (after a power cut: no, until activated).
    pub active: bool,
}
