{{/*
Sidecar helpers for the defender-agent (docs/agent.md). They put the agent beside any
component container, in any chart that holds a copy of this file and _helpers.tpl (taken
from the installed release's chart; not this chart as a subchart, which would install its
operator and etcd again):

  spec:
    shareProcessNamespace: true          # only for reload.method=signal
    containers:
      - name: sniffer
        ...
        volumeMounts:
          {{- include "ml-defender.agent.sharedMount" (dict "ctx" $) | nindent 10 }}
      {{- include "ml-defender.agent.sidecar" (dict "ctx" $ "component" "sniffer" "componentType" "sniffer" "process" "sniffer") | nindent 6 }}
    volumes:
      {{- include "ml-defender.agent.sidecarVolumes" (dict "ctx" $) | nindent 6 }}

and on the pod template's labels, so the etcd NetworkPolicy lets the pod in:

  metadata:
    labels:
      {{- include "ml-defender.agent.podLabels" (dict "ctx" $) | nindent 8 }}

Arguments (a dict):
  ctx            the root context ($); values are read from .Values.agent and .Values.image
  component      the component name in etcd (the DefenderComponent name)
  componentType  sniffer | ml-detector | firewall | rag | custom (default: the stored type)
  process        process name to signal (reload.method=signal, unless pidfile is given)
  pidfile        file holding the pid to signal, on the shared volume (alternative to process)
  url            reload URL (reload.method=http): http:// to localhost, 127.x.x.x or [::1]
  seedConfig     optional path (in the agent container) of a JSON file registered as MASTER
  allowPlaintext true for a component stored unencrypted on purpose (spec.storage); the agent
                 refuses unencrypted configs otherwise (also set for config.plaintextComponents)
  processUser    UID the component process runs as (reload.method=signal): the agent runs as
                 the same UID so it may signal it (reload.signalAccess=sameUser, the default)
  healthCheck    none | process | http | tcp | exec | file (default agent.healthCheck.type)
  healthProcess  process check: process name (default: process) — or healthPidfile
  healthUrl      http check: URL answering 2xx/3xx while the component is well (http://,
                 loopback host, like url)
  healthTcp      tcp check: host:port, host localhost, 127.x.x.x or [::1]
  healthExec     exec check: command line run in the agent container
  healthFile     file check: file the component touches (on the shared volume), with
  healthFileMaxAgeSeconds  the oldest it may be (at least two touch periods)

The agent writes <sharedMountPath>/<component>.json; the component reads it from the same path.
*/}}

{{- define "ml-defender.agent.sidecar" -}}
{{- $ctx := .ctx -}}
{{- $agent := $ctx.Values.agent -}}
{{- $reload := $agent.reload -}}
{{- $component := required "ml-defender.agent.sidecar: component is required" .component -}}
{{- $image := default $ctx.Values.image $agent.image -}}
{{- $endpoints := $agent.etcdEndpoints -}}
{{- if not $endpoints -}}
{{- if $ctx.Values.etcd -}}
{{- $endpoints = include "ml-defender.etcd.endpoints" $ctx | fromJsonArray -}}
{{- else -}}
{{- fail "ml-defender.agent.sidecar: set agent.etcdEndpoints (no etcd of this release to default to)" -}}
{{- end -}}
{{- end -}}
{{- if eq $reload.method "signal" -}}
{{- if and (not .process) (not .pidfile) -}}
{{- fail (printf "ml-defender.agent.sidecar: component %s uses reload.method=signal; pass process or pidfile (and set shareProcessNamespace: true on the pod)" $component) -}}
{{- end -}}
{{- else if eq $reload.method "http" -}}
{{- if not .url -}}
{{- fail (printf "ml-defender.agent.sidecar: component %s uses reload.method=http; pass url" $component) -}}
{{- end -}}
{{- include "ml-defender.agent.ownPodUrl" (dict "component" $component "what" "url" "url" .url) -}}
{{- end -}}
{{- $health := $agent.healthCheck | default dict -}}
{{- $healthType := .healthCheck | default $health.type | default "none" -}}
{{- $healthProcess := .healthProcess | default .process -}}
{{- $healthPidfile := .healthPidfile | default (and (not .healthProcess) .pidfile) -}}
{{- if and (eq $healthType "process") (not $healthProcess) (not $healthPidfile) -}}
{{- fail (printf "ml-defender.agent.sidecar: component %s uses healthCheck=process; pass healthProcess (or process) and set shareProcessNamespace: true on the pod" $component) -}}
{{- else if and (eq $healthType "http") (not .healthUrl) -}}
{{- fail (printf "ml-defender.agent.sidecar: component %s uses healthCheck=http; pass healthUrl" $component) -}}
{{- else if and (eq $healthType "tcp") (not .healthTcp) -}}
{{- fail (printf "ml-defender.agent.sidecar: component %s uses healthCheck=tcp; pass healthTcp (host:port)" $component) -}}
{{- else if and (eq $healthType "exec") (not .healthExec) -}}
{{- fail (printf "ml-defender.agent.sidecar: component %s uses healthCheck=exec; pass healthExec" $component) -}}
{{- else if and (eq $healthType "file") (or (not .healthFile) (not .healthFileMaxAgeSeconds)) -}}
{{- fail (printf "ml-defender.agent.sidecar: component %s uses healthCheck=file; pass healthFile and healthFileMaxAgeSeconds" $component) -}}
{{- else if not (has $healthType (list "none" "process" "http" "tcp" "exec" "file")) -}}
{{- fail (printf "ml-defender.agent.sidecar: component %s: healthCheck %q is not one of none, process, http, tcp, exec, file" $component $healthType) -}}
{{- end -}}
{{- if eq $healthType "http" -}}
{{- include "ml-defender.agent.ownPodUrl" (dict "component" $component "what" "healthUrl" "url" .healthUrl) -}}
{{- else if eq $healthType "tcp" -}}
{{- $tcpHost := regexReplaceAll ":[^:]*$" (toString .healthTcp) "" -}}
{{- include "ml-defender.agent.ownPodHost" (dict "component" $component "what" "healthTcp" "host" $tcpHost) -}}
{{- end -}}
{{- /* Unset (a component chart's values copied before it existed): the agent's default, true. */ -}}
{{- $restore := $agent.restoreEditedFile -}}
{{- if not (or (kindIs "invalid" $restore) (kindIs "bool" $restore)) -}}
{{- fail (printf "ml-defender.agent.sidecar: agent.restoreEditedFile must be true or false, not %q" (toString $restore)) -}}
{{- end -}}
{{- $security := deepCopy ($ctx.Values.containerSecurityContext | default dict) -}}
{{- if eq $reload.method "signal" -}}
{{- $access := $reload.signalAccess | default "sameUser" -}}
{{- if eq $access "capKill" -}}
{{- /* CAP_KILL only reaches the effective set of a root process: a non-root container gets
       added capabilities in its bounding set only. Root with every capability but KILL
       dropped may signal the component whatever its UID, and nothing else. */ -}}
{{- $security = mergeOverwrite $security (dict "runAsUser" 0 "runAsNonRoot" false "allowPrivilegeEscalation" false "capabilities" (dict "drop" (list "ALL") "add" (list "KILL"))) -}}
{{- else if eq $access "sameUser" -}}
{{- if ne (toString .processUser) "<nil>" -}}
{{- $uid := int .processUser -}}
{{- $security = mergeOverwrite $security (dict "runAsUser" $uid "runAsNonRoot" (ne $uid 0)) -}}
{{- end -}}
{{- else -}}
{{- fail (printf "ml-defender.agent.sidecar: agent.reload.signalAccess %q is not sameUser or capKill" $access) -}}
{{- end -}}
{{- end -}}
- name: defender-agent
  image: {{ include "ml-defender.imageRef" (dict "image" $image "default" $ctx.Chart.AppVersion) | quote }}
  imagePullPolicy: {{ $image.pullPolicy | default "IfNotPresent" }}
  command: ["defender-agent"]
  env:
    - name: DEFENDER_AGENT_COMPONENT
      value: {{ $component | quote }}
    {{- with .componentType }}
    - name: DEFENDER_AGENT_COMPONENT_TYPE
      value: {{ . | quote }}
    {{- end }}
    {{- $plaintext := list -}}
    {{- with $ctx.Values.config }}{{ $plaintext = .plaintextComponents | default list }}{{ end }}
    {{- if or .allowPlaintext (has $component $plaintext) }}
    - name: DEFENDER_AGENT_ALLOW_PLAINTEXT
      value: "true"
    {{- end }}
    - name: DEFENDER_AGENT_OUTPUT_PATH
      value: {{ printf "%s/%s.json" $agent.sharedMountPath $component | quote }}
    - name: DEFENDER_AGENT_ETCD_ENDPOINTS
      value: {{ join "," $endpoints | quote }}
    - name: DEFENDER_AGENT_PREFIX
      value: {{ $agent.prefix | default (and $ctx.Values.config $ctx.Values.config.prefix) | default "/ml-defender" | quote }}
    - name: DEFENDER_AGENT_KEYRING_PATH
      value: {{ $agent.keyringMountPath | quote }}
    - name: DEFENDER_AGENT_RELOAD_METHOD
      value: {{ $reload.method | quote }}
    {{- if eq $reload.method "signal" }}
    - name: DEFENDER_AGENT_RELOAD_SIGNAL
      value: {{ $reload.signal | quote }}
    {{- if .pidfile }}
    - name: DEFENDER_AGENT_RELOAD_PIDFILE
      value: {{ .pidfile | quote }}
    {{- else }}
    - name: DEFENDER_AGENT_RELOAD_PROCESS
      value: {{ .process | quote }}
    {{- end }}
    {{- else if eq $reload.method "http" }}
    - name: DEFENDER_AGENT_RELOAD_URL
      value: {{ .url | quote }}
    - name: DEFENDER_AGENT_RELOAD_HTTP_METHOD
      value: {{ $reload.httpMethod | quote }}
    {{- end }}
    {{- with .seedConfig }}
    - name: DEFENDER_AGENT_SEED_CONFIG_PATH
      value: {{ . | quote }}
    {{- end }}
    - name: DEFENDER_AGENT_HEARTBEAT_INTERVAL_SECONDS
      value: {{ $agent.heartbeatIntervalSeconds | quote }}
    - name: DEFENDER_AGENT_HEARTBEAT_MISSES
      value: {{ $agent.heartbeatMisses | quote }}
    - name: DEFENDER_AGENT_LOG_LEVEL
      value: {{ $agent.logLevel | quote }}
    {{- if not (kindIs "invalid" $restore) }}
    - name: DEFENDER_AGENT_RESTORE_EDITED_FILE
      value: {{ toString $restore | quote }}
    {{- end }}
    - name: DEFENDER_AGENT_HEALTH_CHECK
      value: {{ $healthType | quote }}
    {{- if eq $healthType "process" }}
    {{- if $healthProcess }}
    - name: DEFENDER_AGENT_HEALTH_PROCESS
      value: {{ $healthProcess | quote }}
    {{- else }}
    - name: DEFENDER_AGENT_HEALTH_PIDFILE
      value: {{ $healthPidfile | quote }}
    {{- end }}
    {{- else if eq $healthType "http" }}
    - name: DEFENDER_AGENT_HEALTH_URL
      value: {{ .healthUrl | quote }}
    {{- else if eq $healthType "tcp" }}
    - name: DEFENDER_AGENT_HEALTH_TCP
      value: {{ .healthTcp | quote }}
    {{- else if eq $healthType "exec" }}
    - name: DEFENDER_AGENT_HEALTH_EXEC
      value: {{ .healthExec | quote }}
    {{- else if eq $healthType "file" }}
    - name: DEFENDER_AGENT_HEALTH_FILE
      value: {{ .healthFile | quote }}
    - name: DEFENDER_AGENT_HEALTH_FILE_MAX_AGE_SECONDS
      value: {{ .healthFileMaxAgeSeconds | quote }}
    {{- end }}
    {{- if ne $healthType "none" }}
    - name: DEFENDER_AGENT_HEALTH_TIMEOUT_SECONDS
      value: {{ $health.timeoutSeconds | default 2 | quote }}
    - name: DEFENDER_AGENT_HEALTH_START_GRACE_SECONDS
      value: {{ $health.startGraceSeconds | default 30 | quote }}
    {{- end }}
    {{- with $agent.statusPort }}
    - name: DEFENDER_AGENT_STATUS_PORT
      value: {{ . | quote }}
    {{- end }}
    {{- if include "ml-defender.agent.tlsSecret" $ctx }}
    - name: DEFENDER_AGENT_ETCD_CA_FILE
      value: /var/run/ml-defender/etcd-tls/ca.crt
    - name: DEFENDER_AGENT_ETCD_CERT_FILE
      value: /var/run/ml-defender/etcd-tls/tls.crt
    - name: DEFENDER_AGENT_ETCD_KEY_FILE
      value: /var/run/ml-defender/etcd-tls/tls.key
    {{- else if include "ml-defender.agent.caSecret" $ctx }}
    - name: DEFENDER_AGENT_ETCD_CA_FILE
      value: /var/run/ml-defender/etcd-ca/ca.crt
    {{- end }}
    {{- with include "ml-defender.agent.authSecretPrefix" $ctx }}
    # This component's etcd user (etcd.auth): read its configs, write its heartbeats and alerts.
    - name: DEFENDER_AGENT_ETCD_USER
      valueFrom:
        secretKeyRef:
          name: {{ printf "%s%s" . $component }}
          key: username
    - name: DEFENDER_AGENT_ETCD_PASSWORD
      valueFrom:
        secretKeyRef:
          name: {{ printf "%s%s" . $component }}
          key: password
    {{- end }}
    # The instance is the pod: heartbeats are keyed by pod name, which is what the operator
    # restarts when they stop.
    - name: POD_NAME
      valueFrom:
        fieldRef:
          fieldPath: metadata.name
    - name: NODE_NAME
      valueFrom:
        fieldRef:
          fieldPath: spec.nodeName
    {{- with $agent.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $agent.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $agent.statusPort }}
  ports:
    - name: agent-status
      containerPort: {{ . }}
  {{- end }}
  {{- with $security }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: {{ $agent.sharedVolumeName }}
      mountPath: {{ $agent.sharedMountPath }}
    - name: {{ $agent.sharedVolumeName }}-keyring
      mountPath: {{ $agent.keyringMountPath }}
      readOnly: true
    {{- if include "ml-defender.agent.tlsSecret" $ctx }}
    - name: {{ $agent.sharedVolumeName }}-etcd-tls
      mountPath: /var/run/ml-defender/etcd-tls
      readOnly: true
    {{- else if include "ml-defender.agent.caSecret" $ctx }}
    - name: {{ $agent.sharedVolumeName }}-etcd-ca
      mountPath: /var/run/ml-defender/etcd-ca
      readOnly: true
    {{- end }}
{{- end -}}

{{/* Pod labels of an agent-carrying pod: the etcd NetworkPolicy admits pods with them. */}}
{{- define "ml-defender.agent.podLabels" -}}
mldefender.io/etcd-client: "true"
{{- end -}}

{{/*
Name prefix of the agents' etcd credentials Secrets (`<prefix><component>`, keys username and
password), or empty when the agents connect without etcd authentication.
*/}}
{{- define "ml-defender.agent.authSecretPrefix" -}}
{{- $auth := default (dict) .Values.agent.etcdAuth -}}
{{- $on := $auth.enabled -}}
{{- if kindIs "invalid" $on -}}
{{- $on = and .Values.etcd .Values.etcd.enabled .Values.etcd.auth .Values.etcd.auth.enabled -}}
{{- end -}}
{{- if $on -}}
{{- if $auth.secretPrefix -}}
{{- $auth.secretPrefix -}}
{{- else if .Values.etcd -}}
{{- printf "%s-agent-" (include "ml-defender.etcd.fullname" .) -}}
{{- else -}}
{{- fail "agent.etcdAuth.enabled=true needs agent.etcdAuth.secretPrefix (no ml-defender release values to default to)" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Secret holding only ca.crt of etcd's generated/cert-manager certificates, or empty. */}}
{{- define "ml-defender.agent.caSecret" -}}
{{- if .Values.agent.etcdCaSecretName -}}
{{- .Values.agent.etcdCaSecretName -}}
{{- else if and .Values.etcd (include "ml-defender.etcd.tlsManaged" .) -}}
{{- printf "%s-ca" (include "ml-defender.etcd.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* Secret with the etcd client certificate (ca.crt, tls.crt, tls.key), or empty for plain HTTP. */}}
{{- define "ml-defender.agent.tlsSecret" -}}
{{- if .Values.agent.etcdTlsSecretName -}}
{{- .Values.agent.etcdTlsSecretName -}}
{{- else if and .Values.etcd (include "ml-defender.etcd.clientTlsEnabled" .) (not (include "ml-defender.etcd.tlsManaged" .)) -}}
{{- include "ml-defender.etcd.clientTlsSecret" . -}}
{{- end -}}
{{- end -}}

{{/*
The agent calls only the component in its own pod, over loopback: it refuses any other host at
start (exit 2), so a chart that passes one fails here, at install, instead of crash-looping.
The same literal rule as the agent's (defender_agent._http.loopback_host): no name lookups.
*/}}
{{- define "ml-defender.agent.ownPodHost" -}}
{{- $host := lower (trimAll "[]" (toString .host)) -}}
{{- $octet := "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])" -}}
{{- $v4 := printf "^127(\\.%s){3}$" $octet -}}
{{- if not (or (eq $host "localhost") (eq $host "::1") (regexMatch $v4 $host)) -}}
{{- fail (printf "ml-defender.agent.sidecar: component %s: the host of %s must be localhost, 127.x.x.x or [::1] (the agent calls only the component in its own pod)" .component .what) -}}
{{- end -}}
{{- end -}}

{{- define "ml-defender.agent.ownPodUrl" -}}
{{- $url := urlParse (toString .url) -}}
{{- if ne $url.scheme "http" -}}
{{- fail (printf "ml-defender.agent.sidecar: component %s: %s must start with http:// (the component's endpoint in its own pod, over loopback)" .component .what) -}}
{{- end -}}
{{- include "ml-defender.agent.ownPodHost" (dict "component" .component "what" .what "host" $url.hostname) -}}
{{- end -}}

{{/* The shared volume as the component container mounts it (read-only). */}}
{{- define "ml-defender.agent.sharedMount" -}}
{{- $agent := .ctx.Values.agent -}}
- name: {{ $agent.sharedVolumeName }}
  mountPath: {{ $agent.sharedMountPath }}
  readOnly: true
{{- end -}}

{{/*
Pod volumes: the emptyDir shared by agent and component (in memory: the decoded config never
touches the node's disk) and the keyring Secret the operator copies into the namespace.
*/}}
{{- define "ml-defender.agent.sidecarVolumes" -}}
{{- $ctx := .ctx -}}
{{- $agent := $ctx.Values.agent -}}
{{- $secret := $agent.keyringSecretName -}}
{{- if and (not $secret) $ctx.Values.operator -}}
{{- $secret = $ctx.Values.operator.keyring.secretName -}}
{{- end -}}
- name: {{ $agent.sharedVolumeName }}
  emptyDir:
    medium: Memory
    sizeLimit: {{ $agent.sharedSizeLimit | quote }}
- name: {{ $agent.sharedVolumeName }}-keyring
  secret:
    secretName: {{ required "set agent.keyringSecretName (the Secret holding keyring.json in this namespace)" $secret }}
    defaultMode: 0440
{{- with include "ml-defender.agent.tlsSecret" $ctx }}
- name: {{ $agent.sharedVolumeName }}-etcd-tls
  secret:
    secretName: {{ . }}
    defaultMode: 0440
{{- else }}
{{- with include "ml-defender.agent.caSecret" $ctx }}
- name: {{ $agent.sharedVolumeName }}-etcd-ca
  secret:
    secretName: {{ . }}
    defaultMode: 0440
{{- end }}
{{- end }}
{{- end -}}
