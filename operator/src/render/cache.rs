//! The cached renderer: the same documents as [`super::render`], byte for
//! byte, at mesh scale.
//!
//! Every meshed namespace without a visibility scope lists every Service of
//! the mesh, so at 10,000 Services × 500 namespaces rendering each document
//! from scratch repeats the same work 500 times. [`Renderer`] does each
//! piece once per change of its inputs and shares the result:
//!
//! ```text
//! Index ──stamps──► per namespace: judged CRs, inbound        (once per namespace change)
//!                   per Service:  entry → JSON, SHA-256       (once per Service change)
//!                   per namespace: block = its Services, validated
//!                   chunks of a block → deflate part          (once, when a gzip is needed)
//!       visible blocks ──► set: services root, raw length, CRC (once per distinct visible set)
//! per namespace: head + tail (small JSON) + hash(head, root) ──► Document
//! ```
//!
//! # What is reused when
//!
//! - A namespace's judged resources, inbound rules and block are kept while
//!   [`Index::namespace_stamp`] and the trust domain are unchanged.
//! - Otherwise each Service's entry (a fragment) is kept when
//!   [`Index::service_stamp`] is unchanged and its judged policy and routes
//!   compare equal; only the others are rendered, serialized and hashed.
//! - A block whose fragments are all kept is kept (no re-validation).
//! - A block is cut into chunks after each Service whose name hashes to 0
//!   modulo [`CHUNK_SPLIT`] (so a change in a large namespace recompresses
//!   about that many Services, and an insertion moves no other boundary);
//!   a chunk with the same fragments keeps its compressed form.
//! - The services part of a document (root digest, length, CRC, chunk list)
//!   is kept per list of visible namespaces while their blocks are the same:
//!   all unscoped namespaces share one.
//!
//! What a document costs then is its own head and tail: version,
//! generation, hash, namespace, mesh settings and inbound rules. Its bytes
//! ([`Document::to_json`], [`Document::gzip`]) are assembled on demand, the
//! compressed form from shared parts ([`Payload`]), so holding the output of
//! every namespace does not hold a copy per namespace.
//!
//! # Validation
//!
//! Each block is checked with [`weft_proxy_config::validate_services`]
//! when it is built (a namespace's routes only name Services of that
//! namespace, so a block is self-contained), and each document's head and
//! tail with [`ProxyConfig::validate`] without Services: together the rules
//! of `validate()` on the whole document (see `validate_services`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, OnceLock};

use weft_proxy_config::{
    self as pc, Deflated, ProxyConfig, ValidationErrors, service_digest, services_root,
};

use super::{
    CrStatus, EffectivePolicy, EffectiveRoute, assign_generation, judge_namespace, render_inbound,
    render_service, skeleton,
};
use crate::index::Index;

/// A block is cut after each Service whose name hashes to 0 modulo this.
pub const CHUNK_SPLIT: u64 = 32;

/// What the renderer did, cumulatively: tests and benchmarks read it to see
/// what a change cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RenderStats {
    /// Documents rendered.
    pub documents: u64,
    /// Namespaces whose resources were judged again.
    pub namespaces_judged: u64,
    /// Service entries rendered, serialized and hashed.
    pub fragments: u64,
    /// Namespace blocks rebuilt and validated.
    pub blocks: u64,
    /// Services parts (root, length, CRC) computed for a visible set.
    pub sets: u64,
    /// Chunks deflated.
    pub chunks_compressed: u64,
}

/// The cached renderer. See the module documentation.
#[derive(Debug, Default)]
pub struct Renderer {
    namespaces: HashMap<String, NamespaceCache>,
    sets: HashMap<Vec<String>, (u64, Arc<ServicesPart>)>,
    stats: RenderStats,
    compressed: Arc<AtomicU64>,
    pass: u64,
    pruned_at: u64,
}

/// What [`Renderer::render`] produces for one namespace.
#[derive(Clone, Debug)]
pub struct Rendered {
    /// The document.
    pub document: Document,
    /// The verdict on every weft resource of the namespace, as
    /// [`super::RenderOutput::statuses`].
    pub statuses: Vec<CrStatus>,
}

/// One namespace's `proxy.json`, held as parts shared with other documents.
#[derive(Clone, Debug)]
pub struct Document {
    namespace: String,
    generation: u64,
    hash: String,
    head: Vec<u8>,
    tail: Vec<u8>,
    services: Arc<ServicesPart>,
    problems: Option<ValidationErrors>,
}

/// A `proxy.json.gz` held as parts: its own head and tail, and the deflated
/// chunks it shares with other documents.
#[derive(Clone, Debug)]
pub struct Payload {
    head: Vec<u8>,
    chunks: Arc<[Arc<Chunk>]>,
    tail: Vec<u8>,
    len: usize,
}

#[derive(Debug)]
struct NamespaceCache {
    stamp: u64,
    trust_domain: String,
    statuses: Vec<CrStatus>,
    inbound: pc::Inbound,
    block: Arc<Block>,
}

#[derive(Debug)]
struct Fragment {
    name: String,
    stamp: u64,
    policy: Option<EffectivePolicy>,
    routes: Vec<EffectiveRoute>,
    service: pc::Service,
    json: Vec<u8>,
    digest: [u8; 32],
}

/// The Services of one namespace, sorted by name.
#[derive(Debug)]
struct Block {
    fragments: Vec<Arc<Fragment>>,
    chunks: Vec<Arc<Chunk>>,
    problems: Option<ValidationErrors>,
}

#[derive(Debug)]
struct Chunk {
    fragments: Vec<Arc<Fragment>>,
    deflated: OnceLock<Deflated>,
}

/// The `services` array of the documents that see the same blocks.
#[derive(Debug)]
struct ServicesPart {
    blocks: Vec<Arc<Block>>,
    chunks: Arc<[Arc<Chunk>]>,
    root: [u8; 32],
    raw_len: usize,
    crc: OnceLock<pc::Crc>,
    compressed: Arc<AtomicU64>,
}

/// The separator between chunks, deflated once.
static COMMA: LazyLock<Deflated> = LazyLock::new(|| Deflated::compress([b",".as_slice()]));

impl Renderer {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// What the renderer has done so far.
    pub fn stats(&self) -> RenderStats {
        RenderStats {
            chunks_compressed: self.compressed.load(Ordering::Relaxed),
            ..self.stats
        }
    }

    /// Renders the config of `namespace` and judges its weft resources:
    /// the bytes and verdicts of [`super::render`], from cached parts.
    pub fn render(&mut self, index: &Index, namespace: &str) -> Rendered {
        self.pass += 1;
        self.stats.documents += 1;
        let mesh = index.mesh();
        let td = mesh.trust_domain.as_str();

        let mut key = Vec::new();
        let mut blocks = Vec::new();
        for ns in index.visible_from(namespace) {
            let block = &self.refresh(index, ns, td).block;
            if !block.fragments.is_empty() {
                blocks.push(block.clone());
                key.push(ns.to_owned());
            }
        }
        let own = &self.namespaces[namespace];
        let statuses = own.statuses.clone();
        let mut config = skeleton(
            &mesh,
            namespace,
            index.namespace_access_log(namespace),
            own.inbound.clone(),
        );
        let services = self.services_part(key, blocks);

        let mut problems: Vec<pc::ValidationError> = Vec::new();
        if let Err(e) = config.validate() {
            problems.extend(e.0);
        }
        for b in &services.blocks {
            if let Some(e) = &b.problems {
                problems.extend(e.0.iter().cloned());
            }
        }
        assign_generation(&mut config, index.previous(namespace), |c| {
            c.hash_with_services_root(&services.root)
        });
        let (head, tail) = config.json_parts();
        Rendered {
            document: Document {
                namespace: namespace.to_owned(),
                generation: config.generation,
                hash: config.hash,
                head,
                tail,
                services,
                problems: (!problems.is_empty()).then_some(ValidationErrors(problems)),
            },
            statuses,
        }
    }

    /// Drops what no longer serves: namespaces without Services, and visible
    /// sets not used since the previous call. The operator calls it after
    /// each batch.
    pub fn prune(&mut self, index: &Index) {
        self.namespaces
            .retain(|ns, _| index.services(ns).is_some_and(|s| !s.is_empty()));
        let since = self.pruned_at;
        self.sets.retain(|_, (used, _)| *used > since);
        self.pruned_at = self.pass;
    }

    /// The cache of `ns`, brought up to date.
    fn refresh(&mut self, index: &Index, ns: &str, td: &str) -> &NamespaceCache {
        let stamp = index.namespace_stamp(ns);
        let fresh = self
            .namespaces
            .get(ns)
            .is_some_and(|c| c.stamp == stamp && c.trust_domain == td);
        if !fresh {
            let old = self.namespaces.remove(ns).filter(|c| c.trust_domain == td);
            let cache = self.rebuild(index, ns, td, stamp, old.as_ref().map(|c| &c.block));
            self.namespaces.insert(ns.to_owned(), cache);
        }
        &self.namespaces[ns]
    }

    fn rebuild(
        &mut self,
        index: &Index,
        ns: &str,
        td: &str,
        stamp: u64,
        old: Option<&Arc<Block>>,
    ) -> NamespaceCache {
        self.stats.namespaces_judged += 1;
        let judged = judge_namespace(index, ns, td);
        let inbound = render_inbound(index, ns, &judged);

        let previous: HashMap<&str, &Arc<Fragment>> = old
            .map(|b| b.fragments.iter().map(|f| (f.name.as_str(), f)).collect())
            .unwrap_or_default();
        let mut fragments = Vec::new();
        for (name, info) in index.services(ns).into_iter().flatten() {
            let policy = judged.policies.get(name);
            let routes = judged.routes.get(name).map_or(&[][..], Vec::as_slice);
            let service_stamp = index.service_stamp(ns, name);
            let kept = previous.get(name.as_str()).filter(|f| {
                f.stamp == service_stamp && f.policy.as_ref() == policy && f.routes == routes
            });
            if let Some(f) = kept {
                fragments.push(Arc::clone(f));
                continue;
            }
            let Some(service) = render_service(index, td, ns, name, info, &judged) else {
                continue;
            };
            self.stats.fragments += 1;
            let json = serde_json::to_vec(&service).expect("a Service always serializes");
            fragments.push(Arc::new(Fragment {
                name: name.clone(),
                stamp: service_stamp,
                policy: policy.cloned(),
                routes: routes.to_vec(),
                digest: service_digest(&json),
                service,
                json,
            }));
        }

        let same = old.filter(|b| {
            b.fragments.len() == fragments.len()
                && b.fragments
                    .iter()
                    .zip(&fragments)
                    .all(|(a, b)| Arc::ptr_eq(a, b))
        });
        let block = match same {
            Some(b) => Arc::clone(b),
            None => {
                self.stats.blocks += 1;
                Arc::new(Block::new(fragments, td, old))
            }
        };
        NamespaceCache {
            stamp,
            trust_domain: td.to_owned(),
            statuses: judged.statuses,
            inbound,
            block,
        }
    }

    fn services_part(&mut self, key: Vec<String>, blocks: Vec<Arc<Block>>) -> Arc<ServicesPart> {
        if let Some((used, part)) = self.sets.get_mut(&key)
            && part.blocks.len() == blocks.len()
            && part
                .blocks
                .iter()
                .zip(&blocks)
                .all(|(a, b)| Arc::ptr_eq(a, b))
        {
            *used = self.pass;
            return Arc::clone(part);
        }
        self.stats.sets += 1;
        let fragments = || blocks.iter().flat_map(|b| &b.fragments);
        let root = services_root(fragments().map(|f| &f.digest));
        let count = fragments().count();
        let raw_len = fragments().map(|f| f.json.len()).sum::<usize>() + count.saturating_sub(1);
        let chunks: Arc<[Arc<Chunk>]> = blocks
            .iter()
            .flat_map(|b| b.chunks.iter().cloned())
            .collect();
        let part = Arc::new(ServicesPart {
            blocks,
            chunks,
            root,
            raw_len,
            crc: OnceLock::new(),
            compressed: Arc::clone(&self.compressed),
        });
        self.sets.insert(key, (self.pass, Arc::clone(&part)));
        part
    }
}

/// Whether a block is cut after the Service `name` (FNV-1a, stable across
/// processes so output bytes do not depend on the run).
fn cut_after(name: &str) -> bool {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h.is_multiple_of(CHUNK_SPLIT)
}

impl Block {
    fn new(fragments: Vec<Arc<Fragment>>, td: &str, old: Option<&Arc<Block>>) -> Self {
        let problems = pc::validate_services(fragments.iter().map(|f| &f.service), td).err();
        // Chunks of the old block, by their first fragment.
        let reusable: HashMap<*const Fragment, &Arc<Chunk>> = old
            .map(|b| {
                b.chunks
                    .iter()
                    .map(|c| (Arc::as_ptr(&c.fragments[0]), c))
                    .collect()
            })
            .unwrap_or_default();
        let mut chunks = Vec::new();
        let mut current: Vec<Arc<Fragment>> = Vec::new();
        for (i, f) in fragments.iter().enumerate() {
            current.push(Arc::clone(f));
            if cut_after(&f.name) || i + 1 == fragments.len() {
                let run = std::mem::take(&mut current);
                let kept = reusable.get(&Arc::as_ptr(&run[0])).filter(|c| {
                    c.fragments.len() == run.len()
                        && c.fragments.iter().zip(&run).all(|(a, b)| Arc::ptr_eq(a, b))
                });
                chunks.push(match kept {
                    Some(c) => Arc::clone(c),
                    None => Arc::new(Chunk {
                        fragments: run,
                        deflated: OnceLock::new(),
                    }),
                });
            }
        }
        Self {
            fragments,
            chunks,
            problems,
        }
    }
}

impl Chunk {
    /// The chunk's Services, comma-separated, deflated (once).
    fn deflated(&self, counter: &AtomicU64) -> &Deflated {
        self.deflated.get_or_init(|| {
            counter.fetch_add(1, Ordering::Relaxed);
            let comma: &[u8] = b",";
            Deflated::compress(
                self.fragments
                    .iter()
                    .enumerate()
                    .flat_map(|(i, f)| [if i == 0 { &[][..] } else { comma }, &f.json]),
            )
        })
    }
}

impl ServicesPart {
    /// CRC-32 and length of the services' bytes; deflates every chunk.
    fn crc(&self) -> &pc::Crc {
        self.crc.get_or_init(|| {
            let mut crc = pc::Crc::new();
            for (i, c) in self.chunks.iter().enumerate() {
                if i > 0 {
                    crc.combine(COMMA.crc());
                }
                crc.combine(c.deflated(&self.compressed).crc());
            }
            crc
        })
    }
}

impl Document {
    /// The namespace whose pods read it.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Its content hash ([`ProxyConfig::hash`]).
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// Its generation ([`ProxyConfig::generation`]).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Length of `proxy.json` in bytes.
    pub fn raw_len(&self) -> usize {
        self.head.len() + self.services.raw_len + self.tail.len()
    }

    /// [`ProxyConfig::validate`] of the whole document.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        match &self.problems {
            None => Ok(()),
            Some(e) => Err(e.clone()),
        }
    }

    /// The bytes of `proxy.json`.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.raw_len());
        out.extend_from_slice(&self.head);
        for (i, f) in self
            .services
            .blocks
            .iter()
            .flat_map(|b| &b.fragments)
            .enumerate()
        {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(&f.json);
        }
        out.extend_from_slice(&self.tail);
        out
    }

    /// The document as a [`ProxyConfig`] (parsed back from its bytes, with
    /// the checks a proxy runs).
    pub fn to_config(&self) -> Result<ProxyConfig, pc::LoadError> {
        ProxyConfig::load(&self.to_json())
    }

    /// `proxy.json.gz`: one gzip member made of this document's head and
    /// tail, deflated now, and the shared deflated chunks of its Services.
    pub fn gzip(&self) -> Payload {
        let head = Deflated::compress([self.head.as_slice()]);
        let tail = Deflated::compress([self.tail.as_slice()]);
        let mut crc = pc::Crc::new();
        crc.combine(head.crc());
        crc.combine(self.services.crc());
        crc.combine(tail.crc());
        let chunks = Arc::clone(&self.services.chunks);
        let mut start = pc::GZIP_HEADER.to_vec();
        start.extend_from_slice(head.bytes());
        let mut end = tail.bytes().to_vec();
        end.extend_from_slice(&pc::gzip_trailer(&crc));
        let middle: usize = chunks
            .iter()
            .map(|c| c.deflated.get().map_or(0, |d| d.bytes().len()))
            .sum::<usize>()
            + chunks.len().saturating_sub(1) * COMMA.bytes().len();
        Payload {
            len: start.len() + middle + end.len(),
            head: start,
            chunks,
            tail: end,
        }
    }
}

impl Payload {
    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty (never: a gzip member has a header).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes, in one buffer (what a write sends).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len);
        out.extend_from_slice(&self.head);
        for (i, c) in self.chunks.iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(COMMA.bytes());
            }
            out.extend_from_slice(
                c.deflated
                    .get()
                    .expect("a payload's chunks are deflated when it is made")
                    .bytes(),
            );
        }
        out.extend_from_slice(&self.tail);
        out
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        self.to_vec() == other.to_vec()
    }
}
