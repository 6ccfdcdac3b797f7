//! Both backends offer the same features: the same migrations, the same tables and columns.

use std::collections::BTreeSet;

use crate::support::{root, test_settings, Backend, TestDb};

fn migration_names(dir: &str) -> BTreeSet<String> {
    std::fs::read_dir(root().join("migrations").join(dir))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect()
}

async fn columns(db: &enricher::store::Db) -> BTreeSet<(String, String)> {
    use enricher::store::Db;
    match db {
        Db::Sqlite(p) => {
            let tables: Vec<String> = sqlx::query_scalar(
                "select name from sqlite_master where type = 'table'
                 and name not like 'sqlite_%' and name not in ('_sqlx_migrations', 'Jobs', 'Workers')",
            )
            .fetch_all(p)
            .await
            .unwrap();
            let mut out = BTreeSet::new();
            for t in tables {
                let cols: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "select name from pragma_table_info('{t}')"
                )))
                .fetch_all(p)
                .await
                .unwrap();
                for c in cols {
                    out.insert((t.clone(), c));
                }
            }
            out
        }
        Db::Postgres(p) => sqlx::query_as::<_, (String, String)>(
            "select table_name::text, column_name::text from information_schema.columns
             where table_schema = 'public' and table_name <> '_sqlx_migrations'",
        )
        .fetch_all(p)
        .await
        .unwrap()
        .into_iter()
        .collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_schemas_offer_the_same_features() {
    assert_eq!(
        migration_names("sqlite"),
        migration_names("postgres"),
        "the same migrations on both backends"
    );
    let mut seen = Vec::new();
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let db = TestDb::new(backend).await;
        let app = enricher::startup::App::init(test_settings(&db.url))
            .await
            .unwrap();
        seen.push(columns(&app.db).await);
        app.db.close().await;
    }
    assert!(seen[0].len() > 50, "{:?}", seen[0]);
    let only_sqlite: Vec<_> = seen[0].difference(&seen[1]).collect();
    let only_pg: Vec<_> = seen[1].difference(&seen[0]).collect();
    assert!(
        only_sqlite.is_empty() && only_pg.is_empty(),
        "only on SQLite: {only_sqlite:?}\nonly on PostgreSQL: {only_pg:?}"
    );
}
