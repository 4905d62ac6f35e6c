WITH agg AS (
  SELECT
    pm.person_id AS unit,
    SUM(TRY_CAST(e.properties ->> '$.total' AS DOUBLE)) AS c1_c1,
    MAX(e.timestamp) AS c2
  FROM events AS e
  JOIN event_profiles AS ep
    ON ep.source = e.source AND ep.message_id = e.message_id
  JOIN segment_persons AS pm
    ON pm.profile_id = ep.profile_id
  WHERE
    (
      e.received_at <= CAST('2026-02-01 12:00:00+00:00' AS TIMESTAMPTZ)
      AND e.timestamp <= CAST('2026-02-01 12:00:00+00:00' AS TIMESTAMPTZ)
      AND ep.timestamp <= CAST('2026-02-01 12:00:00+00:00' AS TIMESTAMPTZ)
      AND (
        e.event IN ('Order Completed') OR e.event IS NULL
      )
    )
    AND (
      COALESCE(e.event, e.name, e.type) = 'Order Completed'
    )
  GROUP BY
    unit
)
SELECT
  pm.profile_id
FROM segment_persons AS pm
LEFT JOIN agg
  ON agg.unit = pm.person_id
WHERE
  COALESCE(agg.c1_c1, 0) > 500
  AND agg.c2 < CAST('2025-12-03 12:00:00+00:00' AS TIMESTAMPTZ)
