SELECT
  p.profile_id
FROM profiles AS p
WHERE
  (
    p.traits ->> '$.plan'
  ) = 'pro'
  AND TRY_CAST(p.traits ->> '$.age' AS DOUBLE) BETWEEN 18 AND 30
  AND NOT (
    p.traits ->> '$.email'
  ) IS NULL
