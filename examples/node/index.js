// Observatory from Node.js: Connect-ES clients speaking gRPC, with stubs that
// `npm run generate` makes from protos/ (buf + protoc-gen-es).
//
//   TOKEN=$(make -s demo) node index.js
//
// OBSERVATORY_URL defaults to http://127.0.0.1:50051 (https://... with TLS).
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { ContentService } from "./gen/observatory/v1/content_pb.js";
import { VectorService } from "./gen/observatory/v1/vector_pb.js";

const token = process.env.TOKEN;
if (!token) {
  console.error("set TOKEN, e.g. TOKEN=$(make -s demo) node index.js");
  process.exit(2);
}

const transport = createGrpcTransport({
  baseUrl: process.env.OBSERVATORY_URL ?? "http://127.0.0.1:50051",
  // Every call carries the bearer token.
  interceptors: [
    (next) => async (request) => {
      request.header.set("authorization", `Bearer ${token}`);
      return next(request);
    },
  ],
});
const content = createClient(ContentService, transport);
const vectors = createClient(VectorService, transport);

// A unary call: the newest Twitter posts.
const page = await content.listContent({ filter: { platforms: ["twitter"] }, pageSize: 3 });
for (const item of page.contents) {
  console.log(`list ${item.platform} ${item.id} ${item.textContent.slice(0, 50)}`);
}

// Full-text search; int64 fields (counts) arrive as BigInt.
const found = await content.searchContent({ filter: { query: "vindkraft" }, pageSize: 3 });
for (const result of found.results) {
  console.log(`search ${result.content.id} likes=${result.content.likesCount ?? 0n} ${result.snippet}`);
}

// A server stream: text search in the demo's vector collection.
for await (const hit of vectors.searchText({ collection: "demo_posts", query: "wind power", topK: 3 })) {
  console.log(`hit ${hit.item.id} ${hit.score.toFixed(4)}`);
}

// Errors are ConnectErrors with the gRPC code.
try {
  await content.getContent({ id: "00000000-0000-0000-0000-000000000000" });
} catch (error) {
  const code = ConnectError.from(error).code;
  console.log(`error ${Code[code]}`);
}
