"""Chroma in-process, for `python -m bench vectors`: run by the Python of a
separate virtualenv that has `chromadb` (bench.vectors makes it), never
imported by the project. Loads the bench's vectors and queries (.npy), builds
Chroma's HNSW index with the service's parameters, and prints one JSON line:
build seconds, recall@10 and queries/s from `clients` threads."""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time

import chromadb
import numpy as np


def main() -> None:
    data_path, queries_path, truth_path, ef_search, clients, duration = sys.argv[1:7]
    data = np.load(data_path)
    queries = np.load(queries_path)
    truth = np.load(truth_path)
    with tempfile.TemporaryDirectory() as directory:
        client = chromadb.PersistentClient(path=directory)
        collection = client.create_collection(
            "bench",
            configuration={
                "hnsw": {
                    "space": "cosine",
                    "max_neighbors": 16,
                    "ef_construction": 64,
                    "ef_search": int(ef_search),
                }
            },
        )
        started = time.perf_counter()
        step = 5000
        for start in range(0, len(data), step):
            chunk = data[start : start + step]
            collection.add(
                ids=[f"v{i}" for i in range(start, start + len(chunk))], embeddings=chunk
            )
        build = time.perf_counter() - started
        found = 0
        for query, expected in zip(queries, truth, strict=True):
            result = collection.query(query_embeddings=[query], n_results=10)
            found += len({int(i[1:]) for i in result["ids"][0]} & set(expected.tolist()))
        recall = found / (len(queries) * 10)
        counts = [0] * int(clients)
        stop = threading.Event()

        def loop(worker: int) -> None:
            i = worker
            while not stop.is_set():
                collection.query(query_embeddings=[queries[i % len(queries)]], n_results=10)
                counts[worker] += 1
                i += int(clients)

        threads = [threading.Thread(target=loop, args=(w,)) for w in range(int(clients))]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        before = sum(counts)
        started = time.perf_counter()
        time.sleep(float(duration))
        done = sum(counts) - before
        elapsed = time.perf_counter() - started
        stop.set()
        for thread in threads:
            thread.join()
    print(json.dumps({"build_s": build, "recall": recall, "rate": done / elapsed}))


if __name__ == "__main__":
    main()
