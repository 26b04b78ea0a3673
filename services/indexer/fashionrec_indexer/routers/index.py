"""The served index: what it serves (and the model change under way), and rebuilds on demand."""

from __future__ import annotations

from fashionrec_shared.schemas import IndexInfo, RebuildAccepted
from fashionrec_shared.tasks import BuildIndex, TaskName
from fastapi import APIRouter

from fashionrec_indexer import repository as repo
from fashionrec_indexer.deps import EngineDep, SnapshotDep, TasksDep
from fashionrec_indexer.model_change import pending_change

router = APIRouter()


@router.post("/index/rebuild", response_model=RebuildAccepted, status_code=202)
def rebuild(tasks: TasksDep) -> RebuildAccepted:
    task_id = tasks.send(TaskName.BUILD_INDEX, BuildIndex(reason="api", force=True))
    return RebuildAccepted(task_id=task_id)


@router.get("/index", response_model=IndexInfo)
def index_info(engine: EngineDep, snapshot: SnapshotDep) -> IndexInfo:
    build = snapshot.build
    with engine.connect() as conn:
        view = snapshot.view(conn)
        changed = repo.count_changed_since(conn, build.manifest.seen_change_seq if build else 0)
        pending = pending_change(conn, view.model_version)
    return IndexInfo(
        index_version=snapshot.index_version,
        model_version=view.model_version,
        items_in_index=build.size if build else 0,
        items_since_build=changed,
        built_at=build.manifest.created_at if build else None,
        pending_model_version=pending.model_version if pending else None,
        reembed_job_id=str(pending.job_id) if pending else None,
    )
