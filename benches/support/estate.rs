//! A synthetic estate at cluster scale: hosts, proids with a skewed number
//! of placements, and a directory whose groups have drifted from the truth
//! by a known amount. Shared by the `estate` example (which writes it to
//! disk for the command-line benchmarks) and the criterion benchmarks (which
//! also build it in memory).
//!
//! Everything is drawn from one seeded generator in a fixed order, so the
//! same parameters always give the same estate, byte for byte, and the
//! expected plan (groups changed, additions, deletions) is known exactly
//! without running the reconciler: benchmarks use it to check that the
//! numbers they time come from a correct run.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use gmsa_reconciler::directory::Group;
use gmsa_reconciler::model::{Dn, HostName};
use gmsa_reconciler::tree::{ServerInfo, Snapshot};

/// The partition every generated host is in.
pub const PARTITION: &str = "east";
/// The OU the groups live in.
pub const GROUP_OU: &str = "ou=Groups,dc=ad,dc=com";
/// Groups in the OU that belong to no proid (the pattern must skip them).
const OTHER_GROUPS: usize = 10;
/// Apps a proid's instances are spread over.
const APPS: [&str; 6] = ["web", "api", "worker", "db", "batch", "cache"];
/// The Zipf exponent of placements per proid: a few proids hold most
/// placements, most hold a handful.
const SKEW: f64 = 1.0;

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    /// Hosts, all in scope.
    pub hosts: usize,
    /// Placements (instance files), at least one per proid.
    pub placements: usize,
    /// Proids, each with one group.
    pub proids: usize,
    /// Share of true memberships missing from the groups, and (as many
    /// again, on average) stale managed hosts present in them.
    pub drift: f64,
    /// Unmanaged members (user accounts) per true membership, on average.
    pub unmanaged: f64,
    /// The generator's seed.
    pub seed: u64,
}

impl Params {
    /// The named sizes of the benchmarks: `S` and `L`.
    pub fn preset(name: &str) -> Option<Params> {
        let (hosts, placements, proids) = match name {
            "S" | "s" => (1_000, 20_000, 500),
            "L" | "l" => (10_000, 200_000, 5_000),
            _ => return None,
        };
        Some(Params {
            hosts,
            placements,
            proids,
            drift: 0.05,
            unmanaged: 0.02,
            seed: 1,
        })
    }

    /// Why the parameters can't make an estate, if they can't.
    pub fn check(&self) -> Result<(), String> {
        if self.hosts == 0 || self.proids == 0 {
            return Err("--hosts and --proids must be at least 1".into());
        }
        if self.placements < self.proids {
            return Err("--placements must be at least --proids (every proid has one)".into());
        }
        for (name, share) in [("--drift", self.drift), ("--unmanaged", self.unmanaged)] {
            if !(0.0..=1.0).contains(&share) {
                return Err(format!("{name} must be between 0 and 1"));
            }
        }
        Ok(())
    }
}

/// One host.
#[derive(Debug, Clone)]
pub struct Host {
    /// The host (and file) name, `win00042.ad.com`.
    pub name: String,
    /// Its `nt.dn` as the server file spells it.
    pub nt_dn: String,
    /// The same DN as the directory spells it (differently, as AD and the
    /// cluster's inventory do; the reconciler must not churn over it).
    pub dir_dn: String,
    /// Its domain controller.
    pub dc: String,
}

/// One proid's group as the directory holds it.
#[derive(Debug, Clone, Default)]
pub struct GroupState {
    /// Hosts (indexes) in the group, true or stale.
    pub hosts: BTreeSet<usize>,
    /// Unmanaged members (indexes into the users).
    pub users: BTreeSet<usize>,
    /// True members left out: what the plan must add.
    pub missing: usize,
    /// Hosts in the group that run no instance of the proid: what the plan
    /// must delete.
    pub stale: usize,
}

/// What a correct plan of the estate contains, and its sizes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expected {
    /// Distinct (proid, host) pairs: the desired memberships.
    pub memberships: usize,
    /// `member` values in the directory, all groups together.
    pub group_members: usize,
    /// Of those, unmanaged ones (never touched).
    pub unmanaged_members: usize,
    /// Groups that need a change.
    pub groups_changed: usize,
    /// Values to add.
    pub adds: usize,
    /// Values to delete.
    pub deletes: usize,
    /// Members of the largest group after the sync.
    pub largest_group: usize,
}

/// A whole estate.
#[derive(Debug, Clone)]
pub struct Estate {
    /// What it was made from.
    pub params: Params,
    /// The hosts.
    pub hosts: Vec<Host>,
    /// Proid names; the index is the proid's number everywhere.
    pub proids: Vec<String>,
    /// Per host, its instances as `(proid, instance name)`.
    pub placements: Vec<Vec<(usize, String)>>,
    /// Per proid, its group.
    pub groups: Vec<GroupState>,
    /// Per proid, the hosts that run it.
    pub desired: Vec<BTreeSet<usize>>,
    /// DNs of the unmanaged user accounts.
    pub users: Vec<String>,
    /// What the plan must find.
    pub expected: Expected,
}

/// Picks an index from cumulative weights.
fn pick(rng: &mut fastrand::Rng, cumulative: &[f64]) -> usize {
    let total = cumulative.last().copied().unwrap_or(0.0);
    let x = rng.f64() * total;
    cumulative
        .partition_point(|&c| c <= x)
        .min(cumulative.len() - 1)
}

impl Estate {
    /// Generates the estate; `params` must pass [`Params::check`].
    pub fn generate(params: Params) -> Estate {
        let mut rng = fastrand::Rng::with_seed(params.seed);
        let hosts: Vec<Host> = (0..params.hosts)
            .map(|i| Host {
                name: format!("win{i:05}.ad.com"),
                nt_dn: format!("CN=WIN{i:05},OU=Computers,DC=ad,DC=com"),
                dir_dn: format!("cn=win{i:05},ou=Computers,dc=ad,dc=com"),
                dc: format!("dc{}.ad.com", i % 4 + 1),
            })
            .collect();
        let proids: Vec<String> = (0..params.proids).map(|k| format!("proid{k:05}")).collect();

        // Placements per proid: one each, the rest by Zipf weight over a
        // shuffled ranking so that big proids are scattered among the names.
        let mut rank: Vec<usize> = (0..params.proids).collect();
        rng.shuffle(&mut rank);
        let mut cumulative = Vec::with_capacity(params.proids);
        let mut sum = 0.0;
        for r in &rank {
            sum += 1.0 / ((*r + 1) as f64).powf(SKEW);
            cumulative.push(sum);
        }
        let mut per_proid = vec![1usize; params.proids];
        for _ in params.proids..params.placements {
            per_proid[pick(&mut rng, &cumulative)] += 1;
        }

        // Each instance on a uniformly chosen host; instance ids are unique
        // across the cell, as the scheduler's are.
        let mut placements: Vec<Vec<(usize, String)>> = vec![Vec::new(); params.hosts];
        let mut desired: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); params.proids];
        let mut id: u64 = 0;
        for (k, count) in per_proid.iter().enumerate() {
            let apps = 1 + rng.usize(..3);
            let first_app = rng.usize(..APPS.len());
            for _ in 0..*count {
                id += 1;
                let app = APPS[(first_app + rng.usize(..apps)) % APPS.len()];
                let host = rng.usize(..params.hosts);
                placements[host].push((k, format!("{}.{app}#{id:010}", proids[k])));
                desired[k].insert(host);
            }
        }

        let user_count = (params.proids / 5).max(50);
        let users: Vec<String> = (0..user_count)
            .map(|u| format!("cn=svc-user{u:04},ou=Users,dc=ad,dc=com"))
            .collect();

        // The directory's view: each true member dropped with probability
        // `drift`; for each true member, with the same probability, a stale
        // host that runs nothing of the proid; with probability `unmanaged`,
        // a user account.
        let mut groups = Vec::with_capacity(params.proids);
        let mut expected = Expected::default();
        for want in &desired {
            let mut group = GroupState::default();
            for &host in want {
                if rng.f64() < params.drift {
                    group.missing += 1;
                } else {
                    group.hosts.insert(host);
                }
            }
            if want.len() < params.hosts {
                for _ in 0..want.len() {
                    if rng.f64() < params.drift {
                        // A host outside the desired set; a few tries, since
                        // a big proid may run almost everywhere.
                        for _ in 0..8 {
                            let host = rng.usize(..params.hosts);
                            if !want.contains(&host) && group.hosts.insert(host) {
                                group.stale += 1;
                                break;
                            }
                        }
                    }
                }
            }
            for _ in 0..want.len() {
                if rng.f64() < params.unmanaged {
                    group.users.insert(rng.usize(..users.len()));
                }
            }
            expected.memberships += want.len();
            expected.group_members += group.hosts.len() + group.users.len();
            expected.unmanaged_members += group.users.len();
            expected.adds += group.missing;
            expected.deletes += group.stale;
            if group.missing + group.stale > 0 {
                expected.groups_changed += 1;
            }
            expected.largest_group = expected.largest_group.max(want.len() + group.users.len());
            groups.push(group);
        }

        Estate {
            params,
            hosts,
            proids,
            placements,
            groups,
            desired,
            users,
            expected,
        }
    }

    /// The name of proid `k`'s group.
    pub fn group_name(&self, k: usize) -> String {
        format!("{}-gmsa-hosts", self.proids[k])
    }

    /// The DN of proid `k`'s group.
    pub fn group_dn(&self, k: usize) -> String {
        format!("cn={},{GROUP_OU}", self.group_name(k))
    }

    /// The server file of host `i`: YAML with the keys the mirror writes.
    pub fn server_file(&self, i: usize) -> String {
        let host = &self.hosts[i];
        format!(
            "cpu: 800%\ndisk: 500G\nmemory: 64G\nnt.dc: {}\nnt.dn: {}\nnt.domain: ad.com\n\
             partition: {PARTITION}\ntraits:\n- windows\n- gmsa\nup_since: {}\n",
            host.dc,
            host.nt_dn,
            1_700_000_000 + i
        )
    }

    /// Writes the placement tree under `root` (which must not exist yet),
    /// `.modified` last, as the mirror does after its first sync.
    pub fn write_tree(&self, root: &Path) -> io::Result<()> {
        let servers = root.join("servers");
        let placement = root.join("placement");
        fs::create_dir_all(&servers)?;
        fs::create_dir_all(&placement)?;
        for (i, host) in self.hosts.iter().enumerate() {
            fs::write(servers.join(&host.name), self.server_file(i))?;
            let dir = placement.join(&host.name);
            fs::create_dir(&dir)?;
            for (identity, (_, instance)) in self.placements[i].iter().enumerate() {
                let content = format!("{{\"expires\": 1800000000, \"identity\": {identity}}}\n");
                fs::write(dir.join(instance), content)?;
            }
        }
        fs::write(root.join(".modified"), "")
    }

    /// Writes the directory as an LDIF content file: the base entries, a
    /// computer per host, the user accounts, the proids' groups with their
    /// drifted members and a few unrelated groups.
    pub fn write_ldif(&self, path: &Path) -> io::Result<()> {
        let mut out = BufWriter::new(fs::File::create(path)?);
        // No `version: 1` line: slapadd takes it for an entry and fails.
        out.write_all(
            b"dn: dc=ad,dc=com\nobjectClass: dcObject\nobjectClass: organization\ndc: ad\no: ad\n\n\
              dn: ou=Groups,dc=ad,dc=com\nobjectClass: organizationalUnit\nou: Groups\n\n\
              dn: ou=Computers,dc=ad,dc=com\nobjectClass: organizationalUnit\nou: Computers\n\n\
              dn: ou=Users,dc=ad,dc=com\nobjectClass: organizationalUnit\nou: Users\n\n",
        )?;
        for (i, host) in self.hosts.iter().enumerate() {
            writeln!(
                out,
                "dn: {}\nobjectClass: computer\ncn: win{i:05}\nsAMAccountName: WIN{i:05}$\n\
                 dNSHostName: {}\n",
                host.dir_dn, host.name
            )?;
        }
        for (u, dn) in self.users.iter().enumerate() {
            writeln!(
                out,
                "dn: {dn}\nobjectClass: inetOrgPerson\ncn: svc-user{u:04}\nsn: svc-user{u:04}\n"
            )?;
        }
        let mut record = String::new();
        for k in 0..self.proids.len() {
            record.clear();
            let name = self.group_name(k);
            let _ = write!(
                record,
                "dn: {}\nobjectClass: group\ncn: {name}\nsAMAccountName: {name}\n\
                 groupType: -2147483646\n",
                self.group_dn(k)
            );
            let group = &self.groups[k];
            for &host in &group.hosts {
                let _ = writeln!(record, "member: {}", self.hosts[host].dir_dn);
            }
            for &user in &group.users {
                let _ = writeln!(record, "member: {}", self.users[user]);
            }
            record.push('\n');
            out.write_all(record.as_bytes())?;
        }
        for g in 0..OTHER_GROUPS {
            let name = format!("ops-team{g:02}");
            writeln!(
                out,
                "dn: cn={name},{GROUP_OU}\nobjectClass: group\ncn: {name}\nsAMAccountName: {name}\n\
                 groupType: -2147483646\nmember: {}\n",
                self.users[g % self.users.len()]
            )?;
        }
        out.flush()
    }

    /// The snapshot a scan of the written tree gives, built directly.
    pub fn snapshot(&self) -> Snapshot {
        let mut snapshot = Snapshot::default();
        for (i, host) in self.hosts.iter().enumerate() {
            let name = HostName::new(&host.name).expect("generated host names are valid");
            let info = ServerInfo {
                partition: Some(PARTITION.into()),
                dc: Some(host.dc.clone()),
                dn: Some(host.nt_dn.clone()),
            };
            snapshot.servers.insert(name.clone(), Ok(info));
            let instances = self.placements[i].iter().map(|(_, n)| n.clone()).collect();
            snapshot.placements.insert(name, instances);
        }
        snapshot
    }

    /// The groups a search of the group OU gives, built directly.
    pub fn directory_groups(&self) -> Vec<Group> {
        let dn = |s: &str| Dn::parse(s).expect("generated DNs are valid");
        (0..self.proids.len())
            .map(|k| {
                let group = &self.groups[k];
                let hosts = group.hosts.iter().map(|&h| dn(&self.hosts[h].dir_dn));
                let users = group.users.iter().map(|&u| dn(&self.users[u]));
                Group {
                    dn: dn(&self.group_dn(k)),
                    sam_account_name: self.group_name(k),
                    members: hosts.chain(users).collect(),
                }
            })
            .collect()
    }

    /// The expected plan and the estate's sizes, as one JSON object.
    pub fn summary_json(&self) -> String {
        let p = &self.params;
        let e = &self.expected;
        let placements: usize = self.placements.iter().map(Vec::len).sum();
        let mut sizes: Vec<usize> = self.desired.iter().map(BTreeSet::len).collect();
        sizes.sort_unstable();
        let median = sizes.get(sizes.len() / 2).copied().unwrap_or(0);
        let fields: BTreeMap<&str, serde_json::Value> = BTreeMap::from([
            ("hosts", p.hosts.into()),
            ("placements", placements.into()),
            ("proids", p.proids.into()),
            ("drift", p.drift.into()),
            ("unmanaged", p.unmanaged.into()),
            ("seed", p.seed.into()),
            ("memberships", e.memberships.into()),
            ("group_members", e.group_members.into()),
            ("unmanaged_members", e.unmanaged_members.into()),
            ("groups", (p.proids + OTHER_GROUPS).into()),
            ("groups_changed", e.groups_changed.into()),
            ("adds", e.adds.into()),
            ("deletes", e.deletes.into()),
            ("largest_group", e.largest_group.into()),
            ("median_proid_hosts", median.into()),
        ]);
        serde_json::to_string_pretty(&fields).expect("a map of numbers serialises")
    }
}
