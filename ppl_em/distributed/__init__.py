"""EM on a Dask cluster: the client side (:mod:`ppl_em.distributed.engine`) and the
tasks workers run (:mod:`ppl_em.distributed.tasks`). Needs the ``dask`` extra
(``pip install ppl_em[dask]``); importing this package does not import dask."""

from ppl_em.distributed.engine import DaskData, dask_map, persist_data, tree_reduce
from ppl_em.distributed.tasks import ModelPayload, make_payload

__all__ = ["DaskData", "ModelPayload", "dask_map", "make_payload", "persist_data", "tree_reduce"]
