// A BillingService written with @connectrpc/connect-node: a real
// third-party Connect peer for metald's billing client (tests/billing.rs).
// Listens on 127.0.0.1 (port from argv[2], 0 = any), prints
// {"listening": <port>} once, then one JSON line per decoded request:
// {"method": "...", "request": <proto3 JSON of the request>}.
import * as http from "node:http";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import type { ConnectRouter } from "@connectrpc/connect";
import { toJson } from "@bufbuild/protobuf";
import type { DescMessage, MessageShape } from "@bufbuild/protobuf";
import {
  BillingService,
  NotifyPossibleGapRequestSchema,
  NotifyVmStartedRequestSchema,
  NotifyVmStoppedRequestSchema,
  SendHeartbeatRequestSchema,
  SendMetricsBatchRequestSchema,
} from "./gen/billing/v1/billing_pb.js";

function log<D extends DescMessage>(method: string, schema: D, req: MessageShape<D>) {
  process.stdout.write(JSON.stringify({ method, request: toJson(schema, req) }) + "\n");
}

const routes = (router: ConnectRouter) =>
  router.service(BillingService, {
    sendMetricsBatch(req) {
      log("SendMetricsBatch", SendMetricsBatchRequestSchema, req);
      return { success: true, message: "" };
    },
    sendHeartbeat(req) {
      log("SendHeartbeat", SendHeartbeatRequestSchema, req);
      return { success: true };
    },
    notifyVmStarted(req) {
      log("NotifyVmStarted", NotifyVmStartedRequestSchema, req);
      return { success: true };
    },
    notifyVmStopped(req) {
      log("NotifyVmStopped", NotifyVmStoppedRequestSchema, req);
      return { success: true };
    },
    notifyPossibleGap(req) {
      log("NotifyPossibleGap", NotifyPossibleGapRequestSchema, req);
      return { success: true };
    },
  });

const server = http.createServer(connectNodeAdapter({ routes }));
server.listen(Number(process.argv[2] ?? 0), "127.0.0.1", () => {
  const addr = server.address();
  const port = typeof addr === "object" && addr ? addr.port : 0;
  process.stdout.write(JSON.stringify({ listening: port }) + "\n");
});
process.on("SIGTERM", () => server.close(() => process.exit(0)));
// The test holds our stdin: when it goes away (even killed), so do we.
process.stdin.on("end", () => process.exit(0));
process.stdin.resume();
