WITH agg AS (
  SELECT
    ep.profile_id AS unit,
    SUM(TRY_CAST(e.properties ->> '$.total' AS DOUBLE)) FILTER(WHERE
      COALESCE(e.event, e.name, e.type) = 'Order Completed') AS c1,
    COUNT(DISTINCT e.properties ->> '$.category') FILTER(WHERE
      COALESCE(e.event, e.name, e.type) = 'Product Viewed'
      AND e.timestamp > CAST('2025-11-03 12:00:00+00:00' AS TIMESTAMPTZ)) AS c2
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
        COALESCE(e.event, e.name, e.type) = 'Order Completed'
      )
      OR (
        COALESCE(e.event, e.name, e.type) = 'Product Viewed'
        AND e.timestamp > CAST('2025-11-03 12:00:00+00:00' AS TIMESTAMPTZ)
      )
    )
  GROUP BY
    unit
)
SELECT
  p.profile_id
FROM profiles AS p
LEFT JOIN agg
  ON agg.unit = p.profile_id
WHERE
  COALESCE(agg.c1, 0) > 500 AND COALESCE(agg.c2, 0) >= 3
