#!/usr/bin/python3
"""Drives the Kubernetes API stand-in with Debian's python3-kubernetes client.

Run by tests/tests/kube_standin.rs:
  standin_client.py main KUBECONFIG BAD_KUBECONFIG   CRUD, strategic patch, watch, 401
  standin_client.py expired KUBECONFIG RV             watch from a compacted RV
Prints one JSON object per check on stdout; exits non-zero on the first failure.
"""
import json
import sys
import threading
import time

import kubernetes
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException


def report(check, **facts):
    print(json.dumps({"check": check, **facts}), flush=True)


def api_for(path):
    return client.CoreV1Api(config.new_client_from_config(config_file=path))


def main(kubeconfig, bad_kubeconfig):
    v1 = api_for(kubeconfig)
    nodes = v1.list_node()
    names = [n.metadata.name for n in nodes.items]
    assert "n1" in names, names
    rv = nodes.metadata.resource_version
    report("list_node", names=names, resource_version=rv, version=kubernetes.__version__)

    n1 = v1.read_node("n1")
    assert n1.spec.pod_cidr == "10.244.1.0/24", n1.spec.pod_cidr
    assert n1.metadata.annotations is not None
    report("read_node", pod_cidr=n1.spec.pod_cidr, uid=n1.metadata.uid)

    pod = v1.read_namespaced_pod("flannel-abc", "kube-flannel")
    assert pod.spec.node_name == "n1", pod.spec.node_name
    report("read_namespaced_pod", node_name=pod.spec.node_name)

    try:
        v1.read_node("nope")
        raise AssertionError("read_node(nope) succeeded")
    except ApiException as e:
        assert e.status == 404, e.status
        body = json.loads(e.body)
        assert body["reason"] == "NotFound" and body["kind"] == "Status", body
        report("read_node_404", status=e.status, message=body["message"])

    # The client picks strategic merge for a dict body, as flannel does.
    body = {
        "metadata": {"annotations": {"flannel.alpha.coreos.com/public-ip": "10.98.0.1"}},
        "status": {"conditions": [{
            "type": "NetworkUnavailable", "status": "False",
            "reason": "FlannelIsUp", "message": "Flannel is running on this node",
            "lastHeartbeatTime": "2026-01-02T03:04:05Z",
            "lastTransitionTime": "2026-01-02T03:04:05Z"}]},
    }
    patched = v1.patch_node_status("n1", body)
    types = sorted(c.type for c in patched.status.conditions)
    assert types == ["NetworkUnavailable", "Ready"], types
    assert patched.metadata.annotations["flannel.alpha.coreos.com/public-ip"] == "10.98.0.1"
    report("patch_node_status", conditions=types,
           resource_version=patched.metadata.resource_version)

    # A watch from the list's RV sees the patch (MODIFIED), then what a
    # second thread does: create (ADDED), patch (MODIFIED), delete (DELETED).
    def writer():
        time.sleep(0.5)
        w1 = api_for(kubeconfig)
        w1.create_node(client.V1Node(metadata=client.V1ObjectMeta(name="py-node"),
                                     spec=client.V1NodeSpec(pod_cidr="10.244.9.0/24")))
        w1.patch_node("py-node", {"metadata": {"labels": {"py": "yes"}}})
        w1.delete_node("py-node")

    t = threading.Thread(target=writer)
    t.start()
    seen = []
    w = watch.Watch()
    for ev in w.stream(v1.list_node, resource_version=rv, timeout_seconds=5):
        seen.append((ev["type"], ev["object"].metadata.name))
        if (ev["type"], ev["object"].metadata.name) == ("DELETED", "py-node"):
            w.stop()
    t.join()
    assert seen[0] == ("MODIFIED", "n1"), seen
    assert seen[1:] == [("ADDED", "py-node"), ("MODIFIED", "py-node"), ("DELETED", "py-node")], seen
    report("watch", events=seen, last_rv=w.resource_version)

    # No resourceVersion: synthetic ADDED for every node first, then the
    # stream ends at timeout_seconds.
    start = time.monotonic()
    initial = [(ev["type"], ev["object"].metadata.name)
               for ev in watch.Watch().stream(v1.list_node, timeout_seconds=1)]
    assert sorted(initial) == sorted(("ADDED", n) for n in names), initial
    report("watch_from_now", events=initial, seconds=round(time.monotonic() - start, 2))

    bad = api_for(bad_kubeconfig)
    try:
        bad.list_node()
        raise AssertionError("wrong token accepted")
    except ApiException as e:
        assert e.status == 401, e.status
        report("wrong_token", status=e.status, reason=e.reason)


def expired(kubeconfig, rv):
    v1 = api_for(kubeconfig)
    events = []
    try:
        for ev in watch.Watch().stream(v1.list_node, resource_version=rv, timeout_seconds=5):
            events.append(ev)
        raise AssertionError("watch from a compacted RV ended without an error: %r" % events)
    except ApiException as e:
        # The client turns the in-stream ERROR 410 into an exception.
        assert e.status == 410, e.status
        report("expired", status=e.status, reason=e.reason, events=len(events))


if __name__ == "__main__":
    if sys.argv[1] == "main":
        main(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "expired":
        expired(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: standin_client.py main|expired ...")
