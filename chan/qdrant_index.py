"""The gallery's photos in Qdrant: CHAN's score is Qdrant's MaxSim over region vectors, divided by the word count.

With mean pooling, CHAN's hard alignment scores a caption of L pooled words against a photo as
(1/L) sum_i max_k cos(w_i, r_k): exactly Qdrant's late-interaction MaxSim (`MAX_SIM` multivector
comparator, cosine) divided by L. Each photo is one point with two named vectors: `regions`, its K
region embeddings (a multivector, float16, no HNSW graph: MaxSim is computed exactly), and `global`,
their mean (HNSW), which a two-stage query uses to prefetch candidates before MaxSim reranks them, and
which a model trained with a global term adds to MaxSim.
The collection records the checkpoint it was built by, and refuses queries from another one.
"""
from __future__ import annotations

import uuid
from collections.abc import Iterable

import torch

from .similarity import global_vectors

REGIONS, GLOBAL = "regions", "global"
ID_NAMESPACE = uuid.UUID("7b0e4d0a-5c2f-4f57-9d1e-2a8f0c6b9e31")  # point ids are uuid5(namespace, photo id)
LOOKUP_BATCH = 256


class QdrantIndexError(ValueError):
    """A Qdrant target or collection that cannot serve this model; the message says which and why."""


def point_id(photo_id: str) -> str:
    """The point of a photo: the same id in every run, so pushing again overwrites instead of duplicating."""
    return str(uuid.uuid5(ID_NAMESPACE, photo_id))


def connect(target: str):
    """A client for `target`: an http(s) URL of a Qdrant server or cluster, ':memory:', or a local folder
    (qdrant-client's local mode: pure Python, for tests and galleries up to about 20k photos)."""
    from qdrant_client import QdrantClient

    if target.startswith(("http://", "https://")):
        client = QdrantClient(url=target, timeout=10)
        try:
            client.get_collections()
        except Exception as e:  # connection refused, DNS, TLS, auth: all mean the same to the user
            raise QdrantIndexError(f"cannot reach a Qdrant server at {target}: {e}") from e
        return client
    try:
        return QdrantClient(":memory:") if target == ":memory:" else QdrantClient(path=target)
    except Exception as e:  # e.g. another process holds the local folder's lock
        raise QdrantIndexError(f"cannot open the local Qdrant folder {target}: {e}") from e


def check_model(model) -> None:
    """Only CHAN with mean pooling is MaxSim; refuse the others with what they are."""
    c = model.config
    if c.similarity != "hard" or c.pooling != "mean":
        raise QdrantIndexError(f"Qdrant serves CHAN's hard alignment with mean pooling (MaxSim / words); this checkpoint "
                               f"ranks by {c.similarity} similarity with {c.pooling} pooling: serve it in process instead")


class QdrantGallery:
    """One collection of one checkpoint's region embeddings: push photos, query captions."""

    def __init__(self, client, collection: str, target: str = ""):
        self.client, self.collection, self.target = client, collection, target

    @classmethod
    def open(cls, target: str, collection: str, checkpoint_digest: str, dim: int | None = None) -> QdrantGallery:
        """The collection at `target`, created (with `dim`) when missing; refused when another checkpoint built it."""
        from qdrant_client import models

        client = connect(target)
        where = f"collection {collection!r} at {target}"
        if not client.collection_exists(collection):
            if dim is None:
                raise QdrantIndexError(f"no {where}: push a gallery first (python -m chan index --qdrant {target} "
                                       f"--collection {collection} ...)")
            client.create_collection(collection, vectors_config={
                REGIONS: models.VectorParams(
                    size=dim, distance=models.Distance.COSINE, datatype=models.Datatype.FLOAT16,
                    multivector_config=models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM),
                    hnsw_config=models.HnswConfigDiff(m=0)),  # exact MaxSim; a graph over multivectors is slow to build
                GLOBAL: models.VectorParams(size=dim, distance=models.Distance.COSINE),
            }, metadata={"chan_checkpoint_sha1": checkpoint_digest})
        built_by = (client.get_collection(collection).config.metadata or {}).get("chan_checkpoint_sha1")
        if built_by != checkpoint_digest:
            raise QdrantIndexError(f"{where} was built by another checkpoint (sha1 {str(built_by)[:12]}, not "
                                   f"{checkpoint_digest[:12]}): push this one into another --collection")
        return cls(client, collection, target)

    def close(self) -> None:
        """Let go of the server connection, or of a local folder's lock (another client may then open it)."""
        self.client.close()

    def __enter__(self) -> QdrantGallery:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def count(self) -> int:
        return self.client.count(self.collection, exact=True).count

    def present(self, photo_ids: Iterable[str]) -> set[str]:
        """Which of these photos the collection already holds (a push resumes after them)."""
        ids, found = list(photo_ids), set()
        for start in range(0, len(ids), LOOKUP_BATCH):
            records = self.client.retrieve(self.collection, [point_id(i) for i in ids[start : start + LOOKUP_BATCH]],
                                           with_payload=["photo_id"])
            found.update(r.payload["photo_id"] for r in records)
        return found

    def push(self, photo_ids: list[str], regions: torch.Tensor) -> None:
        """Upsert photos with their (N, K, D) region embeddings (all K valid)."""
        from qdrant_client import models

        regions = regions.float().cpu()
        pooled = global_vectors(regions, torch.ones(regions.shape[:2], dtype=torch.bool))
        self.client.upsert(self.collection, [
            models.PointStruct(id=point_id(pid), vector={REGIONS: r.tolist(), GLOBAL: g.tolist()}, payload={"photo_id": pid})
            for pid, r, g in zip(photo_ids, regions, pooled)
        ])

    def _query(self, query, using: str, limit: int, **options) -> list:
        try:
            return self.client.query_points(self.collection, query=query, using=using, limit=limit,
                                            with_payload=["photo_id"], **options).points
        except Exception as e:  # the server went away, or the collection did
            raise QdrantIndexError(f"the Qdrant collection {self.collection!r} at {self.target} did not answer: {e}") from e

    def search(self, words: torch.Tensor, k: int, prefetch: int | None = None,
               global_weight: float = 0.0) -> list[tuple[str, float]]:
        """(photo id, CHAN score) of the top k photos for a caption's (L, D) pooled word embeddings.

        Exact MaxSim over every photo, or with `prefetch`, MaxSim over the `prefetch` photos nearest by the
        global vectors (one query either way). A model trained with a global term (`global_weight` w >= 0)
        scores MaxSim / L + w x cos(global vector, mean word): see `_search_with_global_term`.
        """
        from qdrant_client import models

        words = words.float().cpu()
        centre = global_vectors(words[None], torch.ones(1, len(words), dtype=torch.bool))[0]
        if global_weight:
            return self._search_with_global_term(words, centre, k, prefetch, global_weight)
        options = {}
        if prefetch:
            options["prefetch"] = models.Prefetch(query=centre.tolist(), using=GLOBAL, limit=max(prefetch, k))
        points = self._query(words.tolist(), REGIONS, k, **options)
        return [(p.payload["photo_id"], p.score / len(words)) for p in points]

    def _search_with_global_term(self, words: torch.Tensor, centre: torch.Tensor, k: int, prefetch: int | None,
                                 weight: float) -> list[tuple[str, float]]:
        """Top k by MaxSim / L + w x global cosine. With `prefetch`: every candidate of the two-stage query scored so.
        Exact: the n best photos by MaxSim and the n best by the global cosine, each scored whole; once the k-th
        best score reaches what a photo in neither list could score (the n-th MaxSim plus w x the n-th cosine,
        Fagin's threshold), no other photo can enter the top k; else n grows."""
        from qdrant_client import models

        L, query, centre_list = len(words), words.tolist(), centre.tolist()

        def scored(points, cosines: dict | None = None) -> dict[str, float]:
            return {p.payload["photo_id"]: p.score / L + weight * (cosines[p.id] if cosines is not None else
                                                                   float(torch.tensor(p.vector[GLOBAL]) @ centre))
                    for p in points}

        if prefetch:
            candidates = models.Prefetch(query=centre_list, using=GLOBAL, limit=max(prefetch, k))
            scores = scored(self._query(query, REGIONS, max(prefetch, k), prefetch=candidates, with_vectors=[GLOBAL]))
            return sorted(scores.items(), key=lambda item: -item[1])[:k]
        n = max(4 * k, 64)
        while True:
            by_maxsim = self._query(query, REGIONS, n, with_vectors=[GLOBAL])
            by_global = self._query(centre_list, GLOBAL, n)
            scores = scored(by_maxsim)
            seen = {point_id(pid) for pid in scores}
            rest = [p for p in by_global if p.id not in seen]  # near by the global vector, not by MaxSim
            if rest:
                only = models.Filter(must=[models.HasIdCondition(has_id=[p.id for p in rest])])
                scores.update(scored(self._query(query, REGIONS, len(rest), query_filter=only),
                                     {p.id: p.score for p in rest}))
            ranked = sorted(scores.items(), key=lambda item: -item[1])[:k]
            if len(by_maxsim) < n:  # every photo was scored
                return ranked
            reachable = by_maxsim[-1].score / L + weight * (by_global[-1].score if len(by_global) == n else -1.0)
            if len(ranked) == k and ranked[-1][1] >= reachable:
                return ranked
            n *= 4
