//! What a `--stream` kind means for a run: the clients (their endpoints and
//! tokens) and the rows the writers write for them. For `business`, the
//! stream's keys are businesses created here, before the clients connect.

use crate::args::{Args, StreamKind};
use crate::client::{business_specs, client_specs, ClientSpec};
use crate::error::Result;
use crate::server::Server;
use crate::writer::{create_businesses, Rows};

pub(crate) struct Workload {
    pub(crate) specs: Vec<ClientSpec>,
    pub(crate) rows: Rows,
}

pub(crate) async fn workload(args: &Args, server: &Server) -> Result<Workload> {
    if args.stream == StreamKind::Business {
        let keys = create_businesses(&server.database, args.stream_keys()).await?;
        return Ok(Workload {
            specs: business_specs(&server.secret, args.sockets, &keys)?,
            rows: Rows::Reservations(keys.into()),
        });
    }
    let (dashboards, notifications) = args.split();
    Ok(Workload {
        specs: client_specs(&server.secret, dashboards, notifications)?,
        rows: Rows::Businesses {
            owners: notifications.max(1) as u64,
            per_insert: u64::from(args.rows_per_insert),
        },
    })
}
