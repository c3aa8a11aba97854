//! A real third-party client: the `buf` CLI (npm `@bufbuild/buf`, installed
//! by `make deps` into tests/js) calls CreateVm, GetVmInfo and ListVms with
//! each of `--protocol connect|grpc|grpcweb`, using the proto schema.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;

use support::{TOKEN_A, js_bin, repo_root, start};

fn curl(addr: &std::net::SocketAddr, protocol: &str, method: &str, body: &str) -> serde_json::Value {
    let mut cmd = Command::new(js_bin("buf"));
    cmd.arg("curl")
        .arg("--schema")
        .arg(repo_root().join("proto"))
        .args(["--protocol", protocol])
        .args(["-H", &format!("Authorization: Bearer {TOKEN_A}")])
        .args(["-d", body]);
    if protocol == "grpc" {
        cmd.arg("--http2-prior-knowledge");
    }
    cmd.arg(format!("http://{addr}/vmprovisioner.v1.VmService/{method}"));
    let out = cmd.output().expect("running buf");
    assert!(
        out.status.success(),
        "buf curl --protocol {protocol} {method} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout).expect("buf prints JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buf_curl_speaks_connect_grpc_and_grpcweb() {
    let t = start(&[]).await;
    let addr = t.d().addr;
    let kernel = t.kernel();
    for protocol in ["connect", "grpc", "grpcweb"] {
        let id = format!("buf-{protocol}");
        let create = serde_json::json!({
            "vmId": id,
            "config": {
                "cpu": {"vcpuCount": 2},
                "memory": {"sizeBytes": "268435456"},
                "boot": {"kernelPath": kernel, "kernelArgs": "console=ttyS0"},
                "metadata": {"client": "buf"}
            }
        });
        let addr2 = addr;
        let body = create.to_string();
        let r = tokio::task::spawn_blocking(move || curl(&addr2, protocol, "CreateVm", &body)).await.unwrap();
        assert_eq!(r["vmId"], id, "{protocol}");
        assert_eq!(r["state"], "VM_STATE_CREATED", "{protocol}");

        let body = serde_json::json!({ "vmId": id }).to_string();
        let r = tokio::task::spawn_blocking(move || curl(&addr2, protocol, "GetVmInfo", &body)).await.unwrap();
        assert_eq!(r["vmId"], id);
        assert_eq!(r["config"]["cpu"]["vcpuCount"], 2);
        assert_eq!(r["config"]["metadata"]["client"], "buf");
        assert_eq!(r["backendInfo"]["backend"], "fake");

        let r = tokio::task::spawn_blocking(move || curl(&addr2, protocol, "ListVms", r#"{"pageSize": 10}"#))
            .await
            .unwrap();
        let ids: Vec<&str> = r["vms"].as_array().unwrap().iter().map(|v| v["vmId"].as_str().unwrap()).collect();
        assert!(ids.contains(&id.as_str()), "{protocol}: {ids:?}");
        assert_eq!(r["vms"][0]["customerId"], "cust-a");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buf_curl_sees_error_codes() {
    let t = start(&[]).await;
    let addr = t.d().addr;
    for protocol in ["connect", "grpc", "grpcweb"] {
        let out = tokio::task::spawn_blocking(move || {
            let mut cmd = Command::new(js_bin("buf"));
            cmd.arg("curl").arg("--schema").arg(repo_root().join("proto")).args([
                "--protocol",
                protocol,
                "-d",
                r#"{"vmId":"missing"}"#,
            ]);
            if protocol == "grpc" {
                cmd.arg("--http2-prior-knowledge");
            }
            cmd.args(["-H", &format!("Authorization: Bearer {TOKEN_A}")])
                .arg(format!("http://{addr}/vmprovisioner.v1.VmService/GetVmInfo"))
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("not_found"), "{protocol}: {err}");
        assert!(err.contains("VM missing not found"), "{protocol}: {err}");
    }
}
