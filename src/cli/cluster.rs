//! `fhir-ledger cluster …`: the admin CLI over the admin API of running nodes.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context};
use consensus::{Node, NodeId};
use serde_json::{json, Value};

use crate::api::admin::NodeInfo;

#[derive(clap::Args, Debug)]
pub struct ClusterArgs {
    /// Admin bearer token of the nodes (each node's <data dir>/admin.token, or the value they
    /// were started with).
    #[arg(long, env = "FHIR_LEDGER_ADMIN_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: ClusterCmd,
}

#[derive(clap::Subcommand, Debug)]
enum ClusterCmd {
    /// Membership, leader, term, applied index and each member's replication lag.
    Status {
        /// Any node's API URL, e.g. http://127.0.0.1:8081
        #[arg(long)]
        node: String,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Create a cluster whose voters are `--node` and every `--member` (all started with
    /// --raft-listen and not yet part of a cluster).
    Init {
        #[arg(long)]
        node: String,
        #[arg(long)]
        member: Vec<String>,
    },
    /// Add a started, empty node to the cluster: as a learner that catches up (by snapshot
    /// when the log was compacted), then, with --voter, as a voter.
    Join {
        /// Any node of the cluster.
        #[arg(long)]
        node: String,
        /// The new node's API URL.
        #[arg(long)]
        new: String,
        #[arg(long)]
        voter: bool,
    },
    /// Rebuild a node's search index from its state (run it on each node to rebuild all).
    Reindex {
        #[arg(long)]
        node: String,
    },
    /// Make a learner a voter.
    Promote {
        #[arg(long)]
        node: String,
        #[arg(long)]
        id: NodeId,
    },
    /// Remove a node from the cluster (voters first leave the voter set).
    Remove {
        #[arg(long)]
        node: String,
        #[arg(long)]
        id: NodeId,
    },
}

pub(crate) struct Admin {
    pub(crate) http: reqwest::Client,
    pub(crate) token: String,
}

pub(crate) fn url(base: &str) -> String {
    let base = base.trim_end_matches('/');
    if base.starts_with("http://") || base.starts_with("https://") {
        base.to_string()
    } else {
        format!("http://{base}")
    }
}

impl Admin {
    pub(crate) async fn call(
        &self,
        method: reqwest::Method,
        base: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut req = self.http.request(method, format!("{}{path}", url(base))).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.with_context(|| format!("{base}{path}"))?;
        let status = resp.status();
        let value: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let why = value.pointer("/issue/0/diagnostics").and_then(Value::as_str).unwrap_or("");
            bail!("{base}{path}: {status}: {why}");
        }
        Ok(value)
    }

    async fn node(&self, base: &str) -> anyhow::Result<NodeInfo> {
        Ok(serde_json::from_value(self.call(reqwest::Method::GET, base, "/admin/node", None).await?)?)
    }

    async fn status(&self, base: &str) -> anyhow::Result<Value> {
        self.call(reqwest::Method::GET, base, "/admin/cluster", None).await
    }

    /// The leader's API address, as `base` knows it (waiting out an election).
    async fn leader(&self, base: &str) -> anyhow::Result<String> {
        for _ in 0..100 {
            let s = self.status(base).await?;
            if let Some(api) = s["leader_api"].as_str() {
                return Ok(api.to_string());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("{base} knows of no leader")
    }

    async fn trust(&self, base: &str, id: NodeId, public_key: &str) -> anyhow::Result<()> {
        let body = json!({ "node_id": id, "public_key": public_key });
        self.call(reqwest::Method::POST, base, "/admin/cluster/trust", Some(body)).await.map(|_| ())
    }
}

/// Runs `rebuild` while drawing the node's rebuild progress (`GET /admin/reindex`) on a bar.
async fn with_progress(
    admin: &Admin,
    node: &str,
    rebuild: impl std::future::Future<Output = anyhow::Result<Value>>,
) -> anyhow::Result<Value> {
    let bar = crate::telemetry::progress_bar(0, "leaves");
    let poll = async {
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if let Ok(p) = admin.call(reqwest::Method::GET, node, "/admin/reindex", None).await {
                if let (Some(done), Some(total)) = (p["done_leaves"].as_u64(), p["total_leaves"].as_u64()) {
                    bar.set_length(total);
                    bar.set_position(done);
                }
            }
        }
    };
    let r = tokio::select! {
        r = rebuild => r,
        () = poll => unreachable!("the poll never ends"),
    };
    bar.finish_and_clear();
    r
}

pub async fn run(args: ClusterArgs) -> anyhow::Result<()> {
    let token = args.token.context("the admin token is needed: --token or FHIR_LEDGER_ADMIN_TOKEN")?;
    // Joining waits until the new node caught up, which a large snapshot makes long.
    let http = reqwest::Client::builder().timeout(Duration::from_hours(1)).build()?;
    let admin = Admin { http, token };
    match args.command {
        ClusterCmd::Status { node, json } => {
            let s = admin.status(&node).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print_status(&s);
            }
        }
        ClusterCmd::Reindex { node } => {
            let rebuild = admin.call(reqwest::Method::POST, &node, "/admin/reindex", None);
            let r = with_progress(&admin, &node, rebuild).await?;
            println!("reindexed {} resources in {} ms", r["resources"], r["millis"]);
        }
        ClusterCmd::Init { node, member } => {
            let mut infos = vec![admin.node(&node).await?];
            for m in &member {
                infos.push(admin.node(m).await?);
            }
            let mut members = BTreeMap::<NodeId, Node>::new();
            for info in &infos {
                if info.initialized {
                    bail!("node {} ({}) already belongs to a cluster", info.node_id, info.node.api_addr);
                }
                if info.secrets_id != infos[0].secrets_id {
                    bail!(
                        "node {} has other cluster secrets ({}) than node {} ({}): start every node with the same --secrets-dir",
                        info.node_id, info.secrets_id, infos[0].node_id, infos[0].secrets_id
                    );
                }
                if info.node.raft_addr.is_empty() {
                    bail!("node {} was not started with --raft-listen", info.node_id);
                }
                if members.insert(info.node_id, info.node.clone()).is_some() {
                    bail!("two nodes have id {}", info.node_id);
                }
            }
            // Every member trusts every other until the membership reaches it.
            for info in &infos {
                for other in &infos {
                    admin.trust(&info.node.api_addr, other.node_id, &other.node.public_key).await?;
                }
            }
            let body = json!({ "members": members });
            admin.call(reqwest::Method::POST, &node, "/admin/cluster/init", Some(body)).await?;
            admin.leader(&node).await?;
            print_status(&admin.status(&node).await?);
        }
        ClusterCmd::Join { node, new, voter } => {
            let leader = admin.leader(&node).await?;
            let (lead, joiner) = (admin.node(&leader).await?, admin.node(&new).await?);
            if joiner.initialized {
                bail!("node {} already belongs to a cluster; wipe its data directory to rejoin", joiner.node_id);
            }
            if joiner.secrets_id != lead.secrets_id {
                bail!("node {} has other cluster secrets than the cluster: use the same --secrets-dir", joiner.node_id);
            }
            let status = admin.status(&leader).await?;
            if let Some(nodes) = status["nodes"].as_object() {
                for (id, n) in nodes {
                    let id: NodeId = id.parse()?;
                    admin.trust(&new, id, n["public_key"].as_str().unwrap_or_default()).await?;
                }
            }
            eprintln!("adding node {} as a learner; waiting until it has caught up…", joiner.node_id);
            let mut body = serde_json::to_value(&joiner.node)?;
            body["node_id"] = json!(joiner.node_id);
            let after = admin.call(reqwest::Method::POST, &leader, "/admin/cluster/learners", Some(body)).await?;
            // openraft acknowledges the learner once replication to it started; a snapshot may
            // still be streaming. Wait until the new node applied what the leader had.
            let target = after["last_log_index"].as_u64().unwrap_or(0);
            loop {
                let s = admin.status(&new).await?;
                let applied = s["last_applied"].as_u64().unwrap_or(0);
                if applied >= target {
                    break;
                }
                match s["receiving_snapshot_bytes"].as_u64() {
                    Some(b) => eprintln!("node {}: receiving a snapshot, {b} bytes so far", joiner.node_id),
                    None => eprintln!("node {}: applied {applied} of {target}", joiner.node_id),
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            if voter {
                let body = json!({ "node_ids": [joiner.node_id] });
                admin.call(reqwest::Method::POST, &leader, "/admin/cluster/voters", Some(body)).await?;
            }
            print_status(&admin.status(&leader).await?);
        }
        ClusterCmd::Promote { node, id } => {
            let leader = admin.leader(&node).await?;
            let body = json!({ "node_ids": [id] });
            print_status(&admin.call(reqwest::Method::POST, &leader, "/admin/cluster/voters", Some(body)).await?);
        }
        ClusterCmd::Remove { node, id } => {
            let leader = admin.leader(&node).await?;
            let path = format!("/admin/cluster/nodes/{id}");
            print_status(&admin.call(reqwest::Method::DELETE, &leader, &path, None).await?);
        }
    }
    Ok(())
}

fn opt(v: &Value) -> String {
    v.as_u64().map_or("-".into(), |n| n.to_string())
}

fn print_status(s: &Value) {
    println!(
        "node {}: {} in term {}, leader {}; log {}, applied {}, snapshot {}, compacted to {}{}{}",
        s["node_id"],
        s["state"].as_str().unwrap_or("?"),
        s["term"],
        opt(&s["leader"]),
        opt(&s["last_log_index"]),
        opt(&s["last_applied"]),
        opt(&s["snapshot"]),
        opt(&s["purged"]),
        if s["joint"].as_bool() == Some(true) { " (membership change in progress)" } else { "" },
        s["receiving_snapshot_bytes"]
            .as_u64()
            .map_or(String::new(), |b| format!(", receiving a snapshot ({b} bytes so far)"))
    );
    let voters: Vec<u64> =
        s["voters"].as_array().map(|a| a.iter().filter_map(Value::as_u64).collect()).unwrap_or_default();
    if let Some(nodes) = s["nodes"].as_object() {
        println!("{:>4}  {:<7}  {:<21}  {:<21}  {:>8}  {:>6}", "id", "role", "api", "raft", "matched", "lag");
        for (id, n) in nodes {
            let role = if id.parse().is_ok_and(|i: u64| voters.contains(&i)) { "voter" } else { "learner" };
            let rep = &s["replication"][id];
            println!(
                "{:>4}  {:<7}  {:<21}  {:<21}  {:>8}  {:>6}",
                id,
                role,
                n["api_addr"].as_str().unwrap_or(""),
                n["raft_addr"].as_str().unwrap_or(""),
                opt(&rep["matched"]),
                opt(&rep["lag"])
            );
        }
    }
}
