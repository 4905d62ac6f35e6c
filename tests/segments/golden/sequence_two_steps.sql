WITH seq_c1 AS (
  SELECT
    unit,
    MIN(ts) FILTER(WHERE
      is2 AND NOT start2 IS NULL AND us - start2 <= 86400000000) AS done_at
  FROM (
    SELECT
      *,
      MAX(CASE WHEN is1 THEN us END) OVER (PARTITION BY unit ORDER BY us RANGE BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS start2
    FROM (
      SELECT
        ep.profile_id AS unit,
        e.timestamp AS ts,
        EPOCH_US(e.timestamp) AS us,
        (
          COALESCE(e.event, e.name, e.type) = 'Product Viewed'
        ) AS is1,
        (
          COALESCE(e.event, e.name, e.type) = 'Order Completed'
        ) AS is2
      FROM events AS e
      JOIN event_profiles AS ep
        ON ep.source = e.source AND ep.message_id = e.message_id
      WHERE
        (
          e.received_at <= CAST('2026-02-01 12:00:00+00:00' AS TIMESTAMPTZ)
          AND e.timestamp <= CAST('2026-02-01 12:00:00+00:00' AS TIMESTAMPTZ)
          AND ep.timestamp <= CAST('2026-02-01 12:00:00+00:00' AS TIMESTAMPTZ)
          AND (
            e.event IN ('Order Completed', 'Product Viewed') OR e.event IS NULL
          )
        )
        AND (
          (
            COALESCE(e.event, e.name, e.type) = 'Product Viewed'
          )
          OR (
            COALESCE(e.event, e.name, e.type) = 'Order Completed'
          )
        )
    ) AS s2
  ) AS s
  GROUP BY
    unit
)
SELECT
  p.profile_id
FROM profiles AS p
LEFT JOIN seq_c1
  ON seq_c1.unit = p.profile_id
WHERE
  NOT seq_c1.done_at IS NULL
