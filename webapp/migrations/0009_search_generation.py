"""A counter that moves whenever similar-image results may change: the cache key of cached results.

Results depend on the embeddings (vectors, their collection copy, a row's presence while its image
is searchable) and on the recorded near-duplicate pairs; triggers on those two tables move
`simili_search_generation` whatever writes them (the ORM, a bulk statement, psql). Two bumps:

- at each writing statement, so that a transaction that reads its own writes never reads a
  cached list from before them;
- once more at commit (a deferred constraint trigger, once per transaction), so that a reader
  that took the number between the statement and the commit, and cached what it saw then, is
  left behind as soon as the writer commits.
"""

from django.db import migrations

SQL = """
CREATE SEQUENCE simili_search_generation;

CREATE FUNCTION simili_search_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM nextval('simili_search_generation');
    RETURN NULL;
END $$;

CREATE FUNCTION simili_search_committed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('simili.search_bumped', true), '') <> 'yes' THEN
        PERFORM set_config('simili.search_bumped', 'yes', true);
        PERFORM nextval('simili_search_generation');
    END IF;
    RETURN NULL;
END $$;
"""

TABLES = ("simili_embedding", "simili_nearduplicate")

TRIGGERS = "".join(
    f"""
CREATE TRIGGER {table}_search_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {table}
    FOR EACH STATEMENT EXECUTE FUNCTION simili_search_changed();
CREATE CONSTRAINT TRIGGER {table}_search_committed AFTER INSERT OR UPDATE OR DELETE ON {table}
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION simili_search_committed();
"""
    for table in TABLES
)

REVERSE = "".join(
    f"DROP TRIGGER {table}_search_changed ON {table}; DROP TRIGGER {table}_search_committed ON {table};"
    for table in TABLES
) + """
DROP FUNCTION simili_search_committed();
DROP FUNCTION simili_search_changed();
DROP SEQUENCE simili_search_generation;
"""


class Migration(migrations.Migration):

    dependencies = [
        ("simili", "0008_near_duplicates_and_reindex_state"),
    ]

    operations = [migrations.RunSQL(SQL + TRIGGERS, REVERSE)]
