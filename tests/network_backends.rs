//! Managed NICs through the Firecracker and Cloud Hypervisor backends
//! (their fakes, which record every API request) with host networking on,
//! each test in a network namespace of its own (its thread unshares one;
//! metald's threads and the fake VMMs inherit it): the requests carry the
//! TAP metald made, the MAC it leased and the rate limiters as the APIs
//! define them; a jailed Firecracker's TAP is owned by the jailer's
//! uid/gid; a jailer that joins a network namespace of its own gets no
//! managed NIC, with a message that says what to change.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::in_netns;

use metald::pb::vmprovisioner::v1 as pb;
use serde_json::{Value, json};
use support::{KillOnDrop, create, info, requests, start_with, vm_dir};

const FAKE_FC: &str = env!("CARGO_BIN_EXE_metald-fake-firecracker");
const FAKE_JAILER: &str = env!("CARGO_BIN_EXE_metald-fake-jailer");
const FAKE_CH: &str = env!("CARGO_BIN_EXE_metald-fake-cloud-hypervisor");

fn rate(bandwidth: i64) -> buffa::MessageField<pb::RateLimit, buffa::Inline<pb::RateLimit>> {
    pb::RateLimit { bandwidth, refill_time: 100, burst: 4096, ..Default::default() }.into()
}

/// A VM with one managed NIC (no `tap_device`, no MAC) and `nic`'s limits.
fn config(t: &support::TestDaemon, nic: pb::NetworkInterface) -> pb::VmConfig {
    let mut c = t.config(&t.kernel());
    c.boot = pb::BootConfig {
        kernel_path: t.kernel(),
        initrd_path: t.assets().join("initrd.img").display().to_string(),
        kernel_args: "quiet".into(),
        ..Default::default()
    }
    .into();
    c.network = vec![pb::NetworkInterface { id: "eth0".into(), ..nic }];
    c
}

/// The TAP and MAC metald reports for `id`'s NIC, and that the TAP exists.
async fn leased(t: &support::TestDaemon, id: &str) -> (String, String) {
    let n = info(t, id).await.network_info.as_option().expect("network_info").clone();
    assert!(n.tap_device.starts_with("mt-"), "{n:?}");
    assert!(n.mac_address.starts_with("02:"), "{n:?}");
    assert!(!n.ip_address.is_empty(), "{n:?}");
    let link = std::process::Command::new("ip").args(["-d", "link", "show", "dev", &n.tap_device]).output().unwrap();
    assert!(link.status.success(), "the TAP exists in metald's namespace");
    (n.tap_device.clone(), n.mac_address.clone())
}

fn owner_of(tap: &str) -> String {
    let out = std::process::Command::new("ip").args(["-d", "link", "show", "dev", tap]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn body_of<'a>(reqs: &'a [Value], method: &str, path: &str) -> &'a Value {
    &reqs
        .iter()
        .find(|r| r["method"] == method && r["path"] == path)
        .unwrap_or_else(|| panic!("no {method} {path} in {reqs:#?}"))["body"]
}

#[test]
fn firecracker_gets_the_managed_tap_mac_and_rate_limiters() {
    in_netns(|| async {
        let (t, _g) =
            start_with(&[("BACKEND", "firecracker"), ("FIRECRACKER_BINARY", FAKE_FC)], &[("NETWORK_ENABLED", "true")])
                .await;
        let nic =
            pb::NetworkInterface { rx_rate_limit: rate(1_000_000), tx_rate_limit: rate(500_000), ..Default::default() };
        create(&t, "fcn", config(&t, nic)).await.unwrap();
        let (tap, mac) = leased(&t, "fcn").await;
        let reqs = requests(&vm_dir(&t, "fcn"));
        // Firecracker's `NetworkInterface`: a bucket of `size` bytes refilled
        // every `refill_time` ms (bandwidth × refill time), plus the burst.
        assert_eq!(
            body_of(&reqs, "PUT", "/network-interfaces/eth0"),
            &json!({
                "iface_id": "eth0", "host_dev_name": tap, "guest_mac": mac,
                "rx_rate_limiter": {"bandwidth": {"size": 100_000, "one_time_burst": 4096, "refill_time": 100}},
                "tx_rate_limiter": {"bandwidth": {"size": 50_000, "one_time_burst": 4096, "refill_time": 100}},
            })
        );
        // Not jailed: the TAP is root's.
        assert!(owner_of(&tap).contains("user root") || owner_of(&tap).contains("user 0"), "{}", owner_of(&tap));
        let c = t.client(support::TOKEN_A);
        c.delete_vm(pb::DeleteVmRequest { vm_id: "fcn".into(), ..Default::default() }).await.unwrap();
    });
}

#[test]
fn a_jailed_firecracker_gets_a_tap_owned_by_the_jailer_uid() {
    in_netns(|| async {
        let jail = tempfile::tempdir().unwrap();
        let base = jail.path().join("jail").display().to_string();
        let (t, _g) = start_with(
            &[("BACKEND", "firecracker"), ("FIRECRACKER_BINARY", FAKE_FC)],
            &[
                ("NETWORK_ENABLED", "true"),
                ("JAILER_ENABLED", "true"),
                ("JAILER_BINARY", FAKE_JAILER),
                ("JAILER_UID", "1234"),
                ("JAILER_GID", "1235"),
                ("JAILER_CHROOT_DIR", &base),
            ],
        )
        .await;
        let _g2 = KillOnDrop(jail.path().to_path_buf());
        create(&t, "jn", config(&t, pb::NetworkInterface::default())).await.unwrap();
        let (tap, mac) = leased(&t, "jn").await;
        let details = owner_of(&tap);
        assert!(details.contains("user 1234") && details.contains("group 1235"), "{details}");
        let root = jail.path().join("jail").join("metald-fake-firecracker").join("jn").join("root");
        let reqs = requests(&root);
        let nic = body_of(&reqs, "PUT", "/network-interfaces/eth0");
        assert_eq!(
            (nic["host_dev_name"].as_str(), nic["guest_mac"].as_str()),
            (Some(tap.as_str()), Some(mac.as_str()))
        );
    });
}

#[test]
fn a_jailer_in_its_own_network_namespace_gets_no_managed_nic() {
    in_netns(|| async {
        let jail = tempfile::tempdir().unwrap();
        let base = jail.path().join("jail").display().to_string();
        let netns = jail.path().join("netns-{vm_id}").display().to_string();
        let (t, _g) = start_with(
            &[("BACKEND", "firecracker"), ("FIRECRACKER_BINARY", FAKE_FC)],
            &[
                ("NETWORK_ENABLED", "true"),
                ("JAILER_ENABLED", "true"),
                ("JAILER_BINARY", FAKE_JAILER),
                ("JAILER_CHROOT_DIR", &base),
                ("JAILER_NETNS", &netns),
            ],
        )
        .await;
        let _g2 = KillOnDrop(jail.path().to_path_buf());
        let e = create(&t, "jx", config(&t, pb::NetworkInterface::default())).await.unwrap_err();
        assert_eq!(e.code, connectrpc::ErrorCode::FailedPrecondition, "{e:?}");
        let msg = e.message.unwrap_or_default();
        assert!(msg.contains("UNKEY_METALD_JAILER_NETNS") && msg.contains("tap_device"), "{msg}");
        let out = std::process::Command::new("ip").args(["-o", "link", "show"]).output().unwrap();
        assert!(!String::from_utf8_lossy(&out.stdout).contains(" mt-"), "no TAP was made");
    });
}

#[test]
fn cloud_hypervisor_gets_the_managed_tap_mac_and_rate_limiter() {
    in_netns(|| async {
        let (t, _g) = start_with(
            &[("BACKEND", "cloudhypervisor"), ("CLOUD_HYPERVISOR_BINARY", FAKE_CH)],
            &[("NETWORK_ENABLED", "true")],
        )
        .await;
        let nic = pb::NetworkInterface { tx_rate_limit: rate(2_000_000), ..Default::default() };
        create(&t, "chn", config(&t, nic)).await.unwrap();
        let (tap, mac) = leased(&t, "chn").await;
        let reqs = requests(&vm_dir(&t, "chn"));
        let vm = body_of(&reqs, "PUT", "/api/v1/vm.create");
        let net = &vm["net"][0];
        assert_eq!((net["tap"].as_str(), net["mac"].as_str()), (Some(tap.as_str()), Some(mac.as_str())), "{vm:#}");
        assert_eq!(
            net["rate_limiter_config"],
            json!({"bandwidth": {"size": 200_000, "one_time_burst": 4096, "refill_time": 100}}),
            "{vm:#}"
        );
    });
}
